"""The training loop: the one place with effects (data, devices, files, signals, progress).

``train_and_evaluate(config, workdir)`` builds task, data, optimizer and mesh from the config,
restores the latest checkpoint if the workdir has one (so re-running the same command resumes),
then alternates jitted train steps with periodic logging, evaluation and checkpointing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import sys
import time
from typing import Any

import jax
import numpy as np
import tqdm
from etils import epath

from deepflow import config as config_lib, parallel
from deepflow.optim import build_schedule
from deepflow.registry import ConfigError
from deepflow.regularizers import StoppingRecord
from deepflow.train import (checkpoint as checkpoint_lib, fit, init_from, runtime, tuning,
                            workdir_lock)
from deepflow.train.errors import NonFiniteLossError, Preempted
from deepflow.train.experiment import BEST_DIR, Experiment
from deepflow.train.state import TrainState
from deepflow.train.writers import MetricWriter

log = logging.getLogger("deepflow")


def train_and_evaluate(config: Any, workdir: str, *, debug: bool = False) -> dict[str, float]:
  """Trains (or resumes) the experiment in ``workdir``; returns the final eval metrics.

  The run holds the workdir's lock throughout: a second run on the same workdir is refused
  before it writes anything."""
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  with workdir_lock.hold(workdir):
    return _train_and_evaluate(config, workdir, debug=debug)


def _train_and_evaluate(config: Any, workdir: str, *, debug: bool) -> dict[str, float]:
  # -- Build: the config on disk first (every reader of the run starts there), then everything
  # built from it.
  write_config(config, workdir)
  cfg = config.train
  runtime.use_compilation_cache(cfg.compilation_cache)
  exp = Experiment(config, workdir, debug=debug)
  tuning.apply_record(exp)  # a tuned run resumes (or re-evaluates) with the programs it chose
  if not debug:  # a run that will not fit stops here, before anything but config.json is written
    fit.compile_checked(exp)
  checkpointer = checkpoint_lib.Checkpointer(workdir, cfg.keep_checkpoints)
  writer = MetricWriter(workdir)
  best = _BestKeeper(exp, workdir) if exp.task.regularizer.early_stopping else None
  try:
    # -- Restore the latest checkpoint (a rerun resumes), or initialize (from model.init_from
    # when it is set: only here, so a resume never reloads it).
    if checkpointer.latest_step() is not None:
      state, data_state, step = exp.restore(checkpointer)
      log.info("resuming from the checkpoint at step %d in %s", step, checkpointer.directory)
    else:
      state, data_state = init_from.initial_state(exp), None
    trained, total = exp.partition.count(state.params)
    log.info("trainable parameters: %d of %d", trained, total)
    # -- Train what is left.
    start = int(state.step)
    if start >= cfg.steps or (best and best.record.stopped):
      log.info("training is already complete (step %d of train.steps=%d); evaluating", start,
               cfg.steps)
    else:
      state = _train(exp, state, data_state, start, checkpointer, writer, best)
    # -- The final evaluation: of the last state, or of the best one under early stopping.
    metrics = exp.evaluate(state, config.data.eval_split)
    writer.write(int(state.step), config.data.eval_split, metrics)
    if best:  # early stopping: the run's result is its best checkpoint
      best.observe(int(state.step), state, metrics)
      state, metrics = best.restore_best(state, metrics)
    return metrics
  finally:
    checkpointer.close()
    writer.close()
    if best:
      best.close()


class _BestKeeper:
  """Early stopping in the loop: counts evaluations, keeps the best state in ``workdir/best/``
  (an Orbax checkpoint of one step, plus ``stopping.json``) and hands it back at the end."""

  def __init__(self, exp: Experiment, workdir: str):
    if not exp.config.train.eval_every:
      raise ConfigError("regularizer 'early_stopping' needs train.eval_every > 0")
    self.exp, self.rule = exp, exp.task.regularizer.early_stopping
    self.directory = epath.Path(workdir) / BEST_DIR
    self.path = self.directory / "stopping.json"
    self.record = StoppingRecord()
    if self.path.exists():
      self.record = StoppingRecord(**json.loads(self.path.read_text()))
    self.checkpointer = checkpoint_lib.Checkpointer(str(self.directory), keep=1)

  def observe(self, step: int, state: TrainState, metrics: dict[str, float]) -> bool:
    """Counts the evaluation at ``step`` (saving the state if it is the best); True = stop."""
    if self.record.update(self.rule, step, metrics):
      self.checkpointer.save(step, state, None, force=True)
    if jax.process_index() == 0:
      tmp = self.directory / "stopping.json.tmp"
      tmp.write_text(json.dumps(dataclasses.asdict(self.record)))
      tmp.replace(self.path)  # atomic: a crash never leaves half a record
    return self.record.stopped

  def restore_best(self, state: TrainState, metrics: dict[str, float]):
    self.checkpointer.wait()
    step = self.checkpointer.latest_step()
    if step is None or step == int(state.step):
      return state, metrics
    state, _, _ = self.exp.restore(self.checkpointer, step)
    metrics = self.exp.evaluate(state, self.exp.config.data.eval_split)
    log.info("early stopping: the best %s=%.4f was at step %d; returning that checkpoint",
             self.rule.metric, self.record.best, step)
    return state, metrics

  def close(self) -> None:
    self.checkpointer.close()


class _Preemption:
  """SIGTERM (what a preemptible VM receives) and a first Ctrl-C (SIGINT) ask the loop to save
  and stop at the next step. After the first Ctrl-C, SIGINT gets the operating system's default
  action back, so a second one ends the process at once (the previous checkpoint stays intact:
  saves are atomic).

  Multi-host runs stop through JAX's preemption sync point (every host at the same step); there
  Ctrl-C keeps Python's default, since one host stopping alone would stall the others."""

  def __init__(self):
    self.signal: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self):
    signums = [signal.SIGTERM] + ([signal.SIGINT] if jax.process_count() == 1 else [])
    for signum in signums:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread (e.g. a notebook worker): no handler
        pass
    return self

  def _handle(self, signum, frame):
    self.signal = signum
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.SIG_DFL)
      print("\ndeepflow: interrupted: saving a checkpoint at the next step (Ctrl-C again to "
            "abort at once)", file=sys.stderr, flush=True)

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:  # every host must stop at the same step
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signal is not None

def _train(exp: Experiment, state: TrainState, data_state, start: int, checkpointer,
           writer: MetricWriter, best: _BestKeeper | None = None) -> TrainState:
  config, cfg = exp.config, exp.config.train
  iterator = exp.pipeline.train_iterator(data_state)
  # The logged learning rate as one compiled program, not a dozen op-by-op ones (each compiled,
  # or looked up in the compilation cache, before the first step's metrics are written).
  schedule = jax.jit(build_schedule(config.optimizer, cfg.steps))
  pending: list[dict] = []
  in_flight = parallel.DispatchWindow()
  window_start = time.perf_counter()

  def flush(step: int) -> dict[str, float]:
    """Fetches the window's metrics, enforces the non-finite policy, writes the means."""
    nonlocal window_start
    host = parallel.window_to_host(pending)
    pending.clear()
    means, broken = window_means(host, step, cfg)
    if broken:
      latest = checkpointer.latest_step()
      raise NonFiniteLossError(
          f"loss or gradients became non-finite {broken}; the update was not applied; last "
          f"checkpoint: {'none' if latest is None else f'step {latest}'} (intact)")
    means["learning_rate"] = float(schedule(step - 1))
    elapsed = time.perf_counter() - window_start
    means["steps_per_sec"] = len(host) / max(elapsed, 1e-9)
    means.update(exp.task.extra_metrics(step))
    window_start = time.perf_counter()
    writer.write(step, "train", means)
    writer.flush()
    return means

  progress = tqdm.tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True,
                       disable=not (cfg.progress and jax.process_index() == 0),
                       file=sys.stderr, desc="train")
  profiler = runtime.StepProfiler(cfg.profile_steps, exp.workdir)
  with (_Preemption() as preemption, progress, contextlib.closing(profiler),
        contextlib.closing(iterator)):
    step = start
    while step < cfg.steps:
      # -- One jitted step; its metrics stay on the device until the window is flushed.
      batch = parallel.global_batch(next(iterator), exp.mesh)
      if step == start and cfg.autotune:  # on the run's first batch; the state is only read
        tuning.autotune(exp, state, batch)
      profiler.before(step)
      state, metrics = exp.train_step(state, batch)
      pending.append(metrics)
      in_flight.add(metrics)
      step += 1
      profiler.after(step, metrics)
      progress.update(1)
      stop = preemption.reached(step)
      save_now = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or stop
      # -- Log: the window's means (and the non-finite policy) every train.log_every steps.
      if step % cfg.log_every == 0 or save_now or step == cfg.steps:
        means = flush(step)
        progress.set_postfix(loss=f"{means['loss']:.4f}", refresh=False)
      # -- Evaluate every train.eval_every steps; early stopping counts the evaluations.
      converged = False  # early stopping ran out of patience
      if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
        metrics = exp.evaluate(state, config.data.eval_split)
        writer.write(step, config.data.eval_split, metrics)
        if jax.process_index() == 0:
          progress.write(f"step {step}: {config.data.eval_split} " + _format(metrics))
        converged = best is not None and best.observe(step, state, metrics)
      # -- Checkpoint; stop on preemption or convergence.
      if converged and pending:
        flush(step)
      if save_now or converged:
        checkpointer.save(step, state, iterator.get_state(), force=stop or converged)
      if stop:
        checkpointer.wait()
        raise Preempted(step, interrupted=preemption.signal == signal.SIGINT)
      if converged:
        log.info("early stopping at step %d: no %s improvement in %d evaluations", step,
                 best.rule.metric, best.rule.patience)
        break
  if checkpointer.latest_step() != step:
    checkpointer.save(step, state, iterator.get_state(), force=True)
  writer.flush()
  return state


def write_config(config: Any, workdir: str) -> None:
  """Creates ``workdir`` and writes its ``config.json`` (process 0), where every reader of the run
  (``Experiment.from_workdir``) starts."""
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (epath.Path(workdir) / "config.json").write_text(config_lib.to_json(config))


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


_STEP_FLAGS = ("nonfinite", "nonfinite_streak")  # per-step bookkeeping, not metrics to average


def _format(metrics: dict[str, float]) -> str:
  return " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
