"""Early stopping, a policy of the training loop: stop when an eval metric stops improving, and
end the run on its best state.

Configured as an entry of ``config.regularizers`` (``dict(name='early_stopping', metric=...,
mode=..., patience=..., min_delta=...)``), registered there beside the regularizers of the train
step, but acted on only here: ``BestKeeper`` counts the loop's evaluations, keeps the best state
in ``workdir/best/`` (``BEST_DIR``: an Orbax checkpoint of one step, plus ``stopping.json``, the
``StoppingRecord`` a resumed run goes on counting from) and hands it back at the end.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any, Mapping, Sequence

import jax
from etils import epath

from deepflow.atomic import write_atomic
from deepflow.registry import ConfigError, REGULARIZERS, check_non_negative
from deepflow.train import checkpoint as checkpoint_lib
from deepflow.train.protocols import Evaluating

NAME = "early_stopping"  # its name in config.regularizers
BEST_DIR = "best"  # the best state's one-step checkpoint directory inside a workdir
RECORD = "stopping.json"

log = logging.getLogger("deepflow")


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
  """Stop when ``metric`` of the eval split has not improved by more than ``min_delta`` for
  ``patience`` evaluations in a row; the loop keeps the best checkpoint and ends on it."""
  metric: str = "loss"
  mode: str = "min"
  patience: int = 5
  min_delta: float = 0.0

  def improved(self, value: float, best: float | None) -> bool:
    if best is None or math.isnan(best):
      return not math.isnan(value)
    if self.mode == "min":
      return value < best - self.min_delta
    return value > best + self.min_delta


@REGULARIZERS.register(NAME)
def early_stopping(metric: str = "loss", mode: str = "min", patience: int = 5,
                   min_delta: float = 0.0) -> EarlyStopping:
  """Evaluates every ``train.eval_every`` steps; stops after ``patience`` evaluations without an
  improvement of ``metric`` (``mode`` 'min' or 'max') by more than ``min_delta``. The best
  checkpoint is kept in ``workdir/best/`` and the run's final metrics are the best one's."""
  if mode not in ("min", "max"):
    raise ConfigError(f"regularizer 'early_stopping': mode must be 'min' or 'max', got {mode!r}")
  if not isinstance(patience, int) or patience < 1:
    raise ConfigError(f"regularizer 'early_stopping': patience must be an integer >= 1, "
                      f"got {patience!r}")
  check_non_negative(f"regularizer {NAME!r}", min_delta=min_delta)
  return EarlyStopping(metric, mode, patience, float(min_delta))


def from_config(entries: Sequence[Mapping[str, Any]]) -> EarlyStopping | None:
  """The rule of the ``early_stopping`` entry of ``config.regularizers``, or None without one."""
  found = [e for e in entries if e["name"] == NAME]
  if len(found) > 1:
    raise ConfigError("regularizers list 'early_stopping' more than once")
  if not found:
    return None
  options = {k: v for k, v in dict(found[0]).items() if k != "name"}
  try:
    return early_stopping(**options)
  except TypeError as e:
    raise ConfigError(f"regularizer {NAME!r}: {e}") from e


@dataclasses.dataclass
class StoppingRecord:
  """Where early stopping stands in a run; the loop keeps it as ``workdir/best/stopping.json`` so
  a resumed run goes on counting (and a stopped one stays stopped)."""
  best: float | None = None
  best_step: int = -1
  bad_evals: int = 0
  last_step: int = -1
  stopped: bool = False

  def update(self, rule: EarlyStopping, step: int, metrics: Mapping[str, float]) -> bool:
    """Counts the evaluation at ``step``; True when it is the best so far."""
    if rule.metric not in metrics:
      raise ConfigError(f"early_stopping metric {rule.metric!r} is not an eval metric; "
                        f"known: {', '.join(sorted(metrics))}")
    if step <= self.last_step:  # already counted (a resumed run evaluating the same step again)
      return False
    self.last_step = step
    value = float(metrics[rule.metric])
    if rule.improved(value, self.best):
      self.best, self.best_step, self.bad_evals = value, step, 0
      return True
    self.bad_evals += 1
    self.stopped = self.bad_evals >= rule.patience
    return False


class BestKeeper:
  """Early stopping in the loop: counts evaluations, keeps the best state in ``workdir/best/``
  and hands it back at the end. ``exp`` restores and evaluates it (an ``Experiment``)."""

  def __init__(self, exp: Evaluating, rule: EarlyStopping, workdir: str):
    if not exp.config.train.eval_every:
      raise ConfigError("regularizer 'early_stopping' needs train.eval_every > 0")
    self.exp, self.rule = exp, rule
    self.directory = epath.Path(workdir) / BEST_DIR
    self.path = self.directory / RECORD
    self.record = StoppingRecord()
    if self.path.exists():
      self.record = StoppingRecord(**json.loads(self.path.read_text()))
    self.checkpointer = checkpoint_lib.Checkpointer(str(self.directory), keep=1)

  def observe(self, step: int, state: Any, metrics: dict[str, float]) -> bool:
    """Counts the evaluation at ``step`` (saving the state if it is the best); True = stop."""
    if self.record.update(self.rule, step, metrics):
      self.checkpointer.save(step, state, None, force=True)
    if jax.process_index() == 0:
      write_atomic(self.path, json.dumps(dataclasses.asdict(self.record)))
    return self.record.stopped

  def restore_best(self, state: Any, metrics: dict[str, float]):
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
