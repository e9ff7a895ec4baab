"""Parts of a training loop that every loop over steps shares (the run's, ``train.loop``, and a
vmapped population's, ``train_members``): when a periodic action is due, and the log window,
which fetches a window's metrics at once and applies the non-finite policy to them.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from deepflow import parallel

_STEP_FLAGS = ("nonfinite", "nonfinite_streak")  # per-step bookkeeping, not metrics to average


def is_time(step: int, every: int, total: int | None = None, *, last: bool | None = None
            ) -> bool:
  """Whether an action done every ``every`` steps (0: never) is due after ``step``. At the run's
  last step ``total``: also when ``last`` is True (a log), never when it is False (an evaluation
  the loop does at the end anyway), as the period falls when it is None."""
  if total is not None and step == total and last is not None:
    return last
  return bool(every) and step % every == 0


def window_means(window: list[dict[str, Any]], step: int, cfg: Any
                 ) -> tuple[dict[str, float], str | None]:
  """A log window's train metrics on the host (one dict per step, the last at ``step``) -> the
  means over the steps whose update was applied, with ``nonfinite_steps``; and where the window
  broke the non-finite policy (``cfg``: ``train.nonfinite``, ``train.max_nonfinite``), e.g.
  'at step 7 (3 steps in a row)', else None. The streak is the state's own count
  (``TrainState.nonfinite``, checkpointed with it), so it spans windows and resumes."""
  flags = [float(m["nonfinite"]) for m in window]
  for i, (m, bad) in enumerate(zip(window, flags)):
    streak = int(m["nonfinite_streak"])
    if bad and (cfg.nonfinite == "stop" or streak > cfg.max_nonfinite):
      at = f"at step {step - len(window) + i + 1}"
      return {}, at if cfg.nonfinite == "stop" else f"{at} ({streak} steps in a row)"
  good = [m for m, bad in zip(window, flags) if not bad] or window
  means = {k: float(np.mean([m[k] for m in good])) for k in good[0] if k not in _STEP_FLAGS}
  means["nonfinite_steps"] = float(sum(flags))
  return means, None


class LogWindow:
  """The train metrics of the steps since the last log. They stay on the devices as the steps
  dispatch (at most ``parallel.DispatchWindow``'s steps in flight) and cross to the host at
  once when a log is due (``parallel.window_to_host``)."""

  def __init__(self):
    self.pending: list[Any] = []
    self.in_flight = parallel.DispatchWindow()
    self.started = time.perf_counter()

  def add(self, metrics: Any) -> None:
    self.pending.append(metrics)
    self.in_flight.add(metrics)

  def __len__(self) -> int:
    return len(self.pending)

  def fetch(self) -> tuple[list[Any], float]:
    """(the window's metrics on the host, one tree per step; the seconds it took), emptied."""
    host = parallel.window_to_host(self.pending)
    self.pending.clear()
    now = time.perf_counter()
    seconds, self.started = now - self.started, now
    return host, seconds


def train_members(state: Any, train_step: Callable[[Any, Any], tuple[Any, Any]],
                  batches: Iterator[Any], evaluate: Callable[[Any, int], Sequence[dict]],
                  writers: Sequence[Any], cfg: Any, split: str, *,
                  on_eval: Callable[[int, dict[int, dict]], set[int]] | None = None
                  ) -> tuple[Any, dict[int, str], dict[int, tuple[int, dict]],
                             list[dict[str, float]]]:
  """The loop of several runs trained as one program (a vmapped population: every leaf of the
  state and metrics has a leading member axis): ``cfg.steps`` steps on ``batches``, each
  member's log window written by its writer under the non-finite policy (a member that breaks
  it is failed, the others train on), ``evaluate(state, step)`` (a list of each member's
  metrics) every ``eval_every`` steps and at the end. ``on_eval(step, {member: metrics})`` sees
  each periodic evaluation of the members still training and returns those that stop there
  (their state is the caller's to freeze); the loop ends early once no member trains. Returns
  the final state, the failed members' statuses, the stopped ones' (step, metrics) and every
  member's final metrics."""
  failed: dict[int, str] = {}
  stopped: dict[int, tuple[int, dict]] = {}

  def training(i: int) -> bool:
    return i not in failed and i not in stopped

  def write(step: int, split_name: str, metrics: Sequence[dict[str, float]]) -> None:
    for i, (writer, m) in enumerate(zip(writers, metrics)):
      if training(i):
        writer.write(step, split_name, m)

  window = LogWindow()

  for step in range(1, cfg.steps + 1):
    state, metrics = train_step(state, next(batches))
    window.add(metrics)
    if is_time(step, cfg.log_every, cfg.steps, last=True):
      host, _ = window.fetch()
      means = []
      for i in range(len(writers)):
        member, broken = window_means([jax.tree.map(lambda v: v[i], m) for m in host], step,
                                      cfg)
        if broken and i not in failed:
          failed[i] = f"failed: loss or gradients became non-finite {broken}"
        means.append(member)
      write(step, "train", means)
    if is_time(step, cfg.eval_every, cfg.steps, last=False):
      metrics = evaluate(state, step)
      write(step, split, metrics)
      if on_eval is not None:
        live = {i: m for i, m in enumerate(metrics) if training(i)}
        stopped.update({i: (step, live[i]) for i in on_eval(step, live)})
        if not any(map(training, range(len(writers)))):
          break
  final = evaluate(state, cfg.steps)
  write(cfg.steps, split, final)
  return state, failed, stopped, final
