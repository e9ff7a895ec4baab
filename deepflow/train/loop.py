"""The training loop: the one place with effects (data, devices, files, signals, progress).

``train_and_evaluate(config, workdir)`` builds task, data, optimizer and mesh from the config,
restores the latest checkpoint if the workdir has one (so re-running the same command resumes),
then alternates jitted train steps with periodic logging, evaluation and checkpointing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
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
from deepflow.data.pipeline import MASK, Pipeline
from deepflow.optim import build_schedule
from deepflow.registry import ConfigError, TASKS
from deepflow.regularizers import StoppingRecord
from deepflow.train import checkpoint as checkpoint_lib, runtime
from deepflow.train.state import TrainState, create_state
from deepflow.train.step import compile_steps
from deepflow.train.writers import MetricWriter

log = logging.getLogger("deepflow")


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/inf loss or gradient (the bad update was never applied)."""


class Experiment:
  """Everything built from a config that training and evaluation share."""

  def __init__(self, config: Any, workdir: str | None, *, debug: bool = False, devices=None):
    self.config, self.workdir = config, workdir
    self.pipeline = Pipeline(config, workdir)
    self.task = TASKS.get(config.task.name)(config, self.pipeline.spec)
    self.mesh = parallel.make_mesh(config.mesh, devices)
    self.tx = self.task.optimizer(config.train.steps)
    self.abstract_state = jax.eval_shape(
        functools.partial(create_state, self.task, self.tx, config.seed))
    self.shardings = parallel.state_shardings(self.abstract_state, self.mesh, config.parallel)
    self.train_step, eval_step = compile_steps(self.task, self.tx, self.mesh, self.shardings,
                                               config.train.microbatches, debug=debug)
    self._eval_step = eval_step

  def init_state(self) -> TrainState:
    init = functools.partial(create_state, self.task, self.tx, self.config.seed)
    return jax.jit(init, out_shardings=self.shardings)()

  def restore(self, checkpointer, step: int | None = None):
    return checkpointer.restore(
        checkpoint_lib.abstract_like(self.abstract_state, self.shardings), step)

  def evaluate(self, state: TrainState, split: str) -> dict[str, float]:
    """Metrics over every example of ``split`` (padding rows excluded), with the task's
    ``extra_metrics`` at the state's step."""
    chunks = []
    for batch in self.pipeline.eval_batches(split):
      outputs = self._eval_step(state, parallel.global_batch(batch, self.mesh))
      outputs = parallel.to_host(outputs)
      mask = outputs.pop(MASK) > 0
      chunks.append({k: np.asarray(v)[mask] for k, v in outputs.items()})
    metrics = self.task.summarize({k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]})
    return {**metrics, **self.task.extra_metrics(int(state.step))}


def train_and_evaluate(config: Any, workdir: str, *, debug: bool = False) -> dict[str, float]:
  """Trains (or resumes) the experiment in ``workdir``; returns the final eval metrics."""
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (epath.Path(workdir) / "config.json").write_text(config_lib.to_json(config))
  cfg = config.train
  runtime.use_compilation_cache(cfg.compilation_cache)
  exp = Experiment(config, workdir, debug=debug)
  checkpointer = checkpoint_lib.Checkpointer(workdir, cfg.keep_checkpoints)
  writer = MetricWriter(workdir)
  best = _BestKeeper(exp, workdir) if exp.task.regularizer.early_stopping else None
  try:
    if checkpointer.latest_step() is not None:
      state, data_state, step = exp.restore(checkpointer)
      log.info("resuming from the checkpoint at step %d in %s", step, checkpointer.directory)
    else:
      state, data_state = exp.init_state(), None
    start = int(state.step)
    if start >= cfg.steps or (best and best.record.stopped):
      log.info("training is already complete (step %d of train.steps=%d); evaluating", start,
               cfg.steps)
    else:
      state = _train(exp, state, data_state, start, checkpointer, writer, best)
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
    self.directory = epath.Path(workdir) / "best"
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
  """SIGTERM (what a preemptible VM receives) asks the loop to save and stop at the next step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler, no preemption
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:  # every host must stop at the same step
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


def _train(exp: Experiment, state: TrainState, data_state, start: int, checkpointer,
           writer: MetricWriter, best: _BestKeeper | None = None) -> TrainState:
  config, cfg = exp.config, exp.config.train
  iterator = exp.pipeline.train_iterator(data_state)
  schedule = build_schedule(config.optimizer, cfg.steps)
  pending: list[dict] = []
  streak = [0]  # consecutive non-finite steps, carried across log windows
  window_start = time.perf_counter()

  def flush(step: int) -> dict[str, float]:
    """Fetches the window's metrics, enforces the non-finite policy, writes the means."""
    nonlocal window_start
    host = parallel.to_host(pending)
    pending.clear()
    flags = [float(m["nonfinite"]) for m in host]
    for i, bad in enumerate(flags):
      first_bad = step - len(flags) + i + 1
      streak[0] = streak[0] + 1 if bad else 0
      if bad and (cfg.nonfinite == "stop" or streak[0] > cfg.max_nonfinite):
        latest = checkpointer.latest_step()
        raise NonFiniteLossError(
            f"loss or gradients became non-finite at step {first_bad}"
            f"{'' if cfg.nonfinite == 'stop' else f' ({streak[0]} steps in a row)'}; the update "
            f"was not applied; last checkpoint: "
            f"{'none' if latest is None else f'step {latest}'} (intact)")
    good = [m for m, bad in zip(host, flags) if not bad] or host
    means = {k: float(np.mean([m[k] for m in good])) for k in good[0] if k != "nonfinite"}
    means["nonfinite_steps"] = float(sum(flags))
    means["learning_rate"] = float(schedule(step - 1))
    elapsed = time.perf_counter() - window_start
    means["steps_per_sec"] = len(flags) / max(elapsed, 1e-9)
    means.update(exp.task.extra_metrics(step))
    window_start = time.perf_counter()
    writer.write(step, "train", means)
    writer.flush()
    return means

  progress = tqdm.tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True,
                       disable=not (cfg.progress and jax.process_index() == 0),
                       file=sys.stderr, desc="train")
  profiler = runtime.StepProfiler(cfg.profile_steps, exp.workdir)
  with _Preemption() as preemption, progress, contextlib.closing(profiler):
    step = start
    while step < cfg.steps:
      batch = parallel.global_batch(next(iterator), exp.mesh)
      profiler.before(step)
      state, metrics = exp.train_step(state, batch)
      pending.append(metrics)
      step += 1
      profiler.after(step, metrics)
      progress.update(1)
      stop = preemption.reached(step)
      save_now = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or stop
      if step % cfg.log_every == 0 or save_now or step == cfg.steps:
        means = flush(step)
        progress.set_postfix(loss=f"{means['loss']:.4f}", refresh=False)
      converged = False  # early stopping ran out of patience
      if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
        metrics = exp.evaluate(state, config.data.eval_split)
        writer.write(step, config.data.eval_split, metrics)
        if jax.process_index() == 0:
          progress.write(f"step {step}: {config.data.eval_split} " + _format(metrics))
        converged = best is not None and best.observe(step, state, metrics)
      if converged and pending:
        flush(step)
      if save_now or converged:
        checkpointer.save(step, state, iterator.get_state(), force=stop or converged)
      if stop:
        log.warning("preemption requested: saved the checkpoint at step %d; stopping", step)
        checkpointer.wait()
        raise Preempted(step)
      if converged:
        log.info("early stopping at step %d: no %s improvement in %d evaluations", step,
                 best.rule.metric, best.rule.patience)
        break
  if checkpointer.latest_step() != step:
    checkpointer.save(step, state, iterator.get_state(), force=True)
  writer.flush()
  return state


class Preempted(Exception):
  """Raised after the loop saved a checkpoint on SIGTERM; the CLI exits 0 and a rerun resumes."""

  def __init__(self, step: int):
    super().__init__(f"preempted at step {step}; checkpoint saved, rerun to resume")
    self.step = step


def _format(metrics: dict[str, float]) -> str:
  return " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
