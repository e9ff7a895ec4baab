"""The training loop: a run's effects (data, devices, files, signals, progress) around the pure
steps. Its parts that any loop over steps shares (when a periodic action is due, the log window
and its non-finite policy) are ``train.periodic``; early stopping is ``train.early_stopping``.

``train_and_evaluate(config, workdir)`` builds task, data, optimizer and mesh from the config,
restores the latest checkpoint if the workdir has one (so re-running the same command resumes),
then alternates jitted train steps with periodic logging, evaluation and checkpointing.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import sys
from typing import Any, Callable

import jax
import tqdm
from etils import epath

from deepflow import config as config_lib, parallel
from deepflow.optim import build_schedule
from deepflow.train import (checkpoint as checkpoint_lib, early_stopping, fit, init_from, runtime,
                            tuning, workdir_lock)
from deepflow.train.errors import NonFiniteLossError, Preempted, Stopped
from deepflow.train.experiment import Experiment
from deepflow.train.periodic import LogWindow, is_time, window_means
from deepflow.train.state import TrainState
from deepflow.train.writers import MetricWriter

log = logging.getLogger("deepflow")
EvalHook = Callable[[int, dict[str, float]], bool]  # (step, eval metrics) -> stop the run here


def train_and_evaluate(config: Any, workdir: str, *,
                       on_eval: EvalHook | None = None) -> dict[str, float]:
  """Trains (or resumes) the experiment in ``workdir``; returns the final eval metrics.

  The run holds the workdir's lock throughout: a second run on the same workdir is refused
  before it writes anything. ``on_eval(step, metrics)`` sees every periodic evaluation; when it
  returns True (a sweep's pruner), the loop saves a checkpoint there and raises ``Stopped``."""
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  with workdir_lock.hold(workdir):
    return _train_and_evaluate(config, workdir, on_eval=on_eval)


def _train_and_evaluate(config: Any, workdir: str, *,
                        on_eval: EvalHook | None = None) -> dict[str, float]:
  # -- Build: the config on disk first (every reader of the run starts there), then everything
  # built from it.
  write_config(config, workdir)
  cfg = config.train
  runtime.use_compilation_cache(cfg.compilation_cache)
  exp = Experiment(config, workdir)
  tuning.apply_record(exp)  # a tuned run resumes (or re-evaluates) with the programs it chose
  if not jax.config.jax_disable_jit:  # --debug steps eagerly: nothing to compile or check
    fit.compile_checked(exp)  # a run that will not fit stops here, before the run writes
  checkpointer = checkpoint_lib.Checkpointer(workdir, cfg.keep_checkpoints)
  writer = MetricWriter(workdir)
  best = (early_stopping.BestKeeper(exp, exp.early_stopping, workdir) if exp.early_stopping
          else None)
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
      state = _train(exp, state, data_state, start, checkpointer, writer, best, on_eval)
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
           writer: MetricWriter, best: early_stopping.BestKeeper | None = None,
           on_eval: EvalHook | None = None) -> TrainState:
  config, cfg = exp.config, exp.config.train
  iterator = exp.pipeline.train_iterator(data_state)
  # The logged learning rate as one compiled program, not a dozen op-by-op ones (each compiled,
  # or looked up in the compilation cache, before the first step's metrics are written).
  schedule = jax.jit(build_schedule(config.optimizer, cfg.steps))
  window = LogWindow()

  def flush(step: int) -> dict[str, float]:
    """Fetches the window's metrics, enforces the non-finite policy, writes the means."""
    host, elapsed = window.fetch()
    means, broken = window_means(host, step, cfg)
    if broken:
      latest = checkpointer.latest_step()
      raise NonFiniteLossError(
          f"loss or gradients became non-finite {broken}; the update was not applied; last "
          f"checkpoint: {'none' if latest is None else f'step {latest}'} (intact)")
    means["learning_rate"] = float(schedule(step - 1))
    means["steps_per_sec"] = len(host) / max(elapsed, 1e-9)
    means.update(exp.update.extra_metrics(step))
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
      window.add(metrics)
      step += 1
      profiler.after(step, metrics)
      progress.update(1)
      stop = preemption.reached(step)
      save_now = is_time(step, cfg.checkpoint_every) or stop
      # -- Log: the window's means (and the non-finite policy) every train.log_every steps.
      if is_time(step, cfg.log_every, cfg.steps, last=True) or save_now:
        means = flush(step)
        progress.set_postfix(loss=f"{means['loss']:.4f}", refresh=False)
      # -- Evaluate every train.eval_every steps; early stopping counts the evaluations.
      converged = halted = False  # early stopping ran out of patience; on_eval said stop
      if is_time(step, cfg.eval_every, cfg.steps, last=False):
        metrics = exp.evaluate(state, config.data.eval_split)
        writer.write(step, config.data.eval_split, metrics)
        if jax.process_index() == 0:
          progress.write(f"step {step}: {config.data.eval_split} " + _format(metrics))
        converged = best is not None and best.observe(step, state, metrics)
        halted = on_eval is not None and on_eval(step, metrics)
      # -- Checkpoint; stop on preemption, convergence or the hook's word.
      if (converged or halted) and len(window):
        flush(step)
      if save_now or converged or halted:
        checkpointer.save(step, state, iterator.get_state(), force=stop or converged or halted)
      if halted:
        checkpointer.wait()
        raise Stopped(step, metrics)
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


def _format(metrics: dict[str, float]) -> str:
  return " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
