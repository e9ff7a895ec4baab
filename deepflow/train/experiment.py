"""An experiment: everything built from a config that training, evaluation and every command
reading a finished run share, and the one way to reopen a run from its workdir.

``Experiment.from_workdir(workdir, overrides, checkpoint=...)`` reads ``config.json``, rebuilds
the experiment and restores a checkpoint. Every command that reads a run (``eval``, ``explain``,
``sample``, ``export``) goes through it: those after training take the run as one
``RunSource(workdir, overrides, checkpoint)`` (or a bare workdir) and ``--checkpoint`` has the
same default everywhere:

  best    the run's result: the early-stopping best checkpoint (``workdir/best/``) when the run
          kept one, otherwise the latest; what ``train_and_evaluate`` returned (the default)
  latest  the newest checkpoint in ``workdir/checkpoints/`` (where a resume starts)
  STEP    that step of ``workdir/checkpoints/`` (one of those ``train.keep_checkpoints`` kept)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Mapping, NamedTuple

import jax
import numpy as np
from etils import epath

from deepflow import config as config_lib, parallel, qat, tasks  # noqa: F401  (tasks fills TASKS)
from deepflow.data.pipeline import MASK, DataPipeline
from deepflow.data.text import make_pipeline
from deepflow.registry import ConfigError, TASKS
from deepflow.train import (CHECKPOINTS, DEFAULT_CHECKPOINT, checkpoint as checkpoint_lib,
                            early_stopping, tuning)
from deepflow.train.early_stopping import BEST_DIR
from deepflow.train.state import TrainState, create_state
from deepflow.train.step import compile_steps
from deepflow.train.update import Update, build_update, check_selectors



class Experiment:
  """Everything built from a config that training and evaluation share."""

  def __init__(self, config: Any, workdir: str | None, *, devices=None):
    self.config, self.workdir = config, workdir
    self.pipeline: DataPipeline = make_pipeline(config, workdir,
                                                progress=bool(config.train.progress))
    self.early_stopping = early_stopping.from_config(config.regularizers)  # the loop's policy
    self.task = build_task(config, self.pipeline.spec)
    self.mesh = parallel.make_mesh(config.mesh, devices)
    # Around the task's objective: optimizer, frozen parameters, LoRA, DP-SGD, regularizers.
    self.update = build_update(config, self.task, config.train.steps)
    self.partition, self.tx = self.update.partition, self.update.tx
    self.abstract_state = jax.eval_shape(
        functools.partial(create_state, self.update, self.tx, config.seed))
    check_selectors(self.update, config, self.abstract_state.params)
    self.shardings = parallel.state_shardings(self.abstract_state, self.mesh, config.parallel)
    # deepflow's per-platform defaults and train.xla_options; autotune's record goes over them.
    self.base_options = tuning.step_options(config.train.xla_options,
                                            self.mesh.devices.flat[0].platform)
    self.use_compiler_options(self.base_options)

  @classmethod
  def from_workdir(cls, workdir: str, overrides: Iterable[str] = (), *,
                   checkpoint: str | int = DEFAULT_CHECKPOINT) -> Restored:
    """The run in ``workdir`` (a local path or a URL) reopened: its config (with ``overrides``,
    e.g. ``data.data_dir=...``), the experiment and the state of ``checkpoint`` (see the module
    docstring). A directory that is not a run, or has no such checkpoint, is a one-line
    ``FileNotFoundError``; a bad ``checkpoint`` value a ``ConfigError``."""
    which = parse_checkpoint(checkpoint)
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
      raise FileNotFoundError(f"{workdir} is not a deepflow run (no config.json)")
    config = config_lib.config_from_json(path.read_text(), overrides)
    checkpointer, which = _open_checkpoints(workdir, which)
    try:
      latest = checkpointer.latest_step()
      if latest is None:
        raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}: train the run "
                                f"first (deepflow train --workdir {workdir} ...)")
      if isinstance(which, int) and which not in checkpointer.manager.all_steps():
        kept = ", ".join(map(str, sorted(checkpointer.manager.all_steps())))
        raise FileNotFoundError(f"no checkpoint of step {which} in {checkpointer.directory} "
                                f"(kept: {kept})")
      exp = cls(config, workdir)
      tuning.apply_record(exp)  # the steps the run was trained and evaluated with
      state, _, step = exp.restore(checkpointer, which if isinstance(which, int) else None)
    finally:
      checkpointer.close()
    return Restored(exp, state, int(step), which if isinstance(which, str) else "step")

  def use_compiler_options(self, options: dict, train_step=None) -> dict:
    """Rebuilds the train and eval steps with XLA ``options`` (``deepflow.train.tuning``);
    ``train_step``, if given, is that train step already compiled (``compiled_train_step``)."""
    self.compiler_options = dict(options)
    self.train_step, self._eval_step = self._compile(self.compiler_options)
    if train_step is not None:
      self.train_step = train_step
    return self.compiler_options

  def compiled_train_step(self, options: dict, task=None):
    """A train step like ``train_step`` but compiled with XLA ``options``, and of ``task`` if
    given (one built from a variant of the config with the same variables, e.g. another remat
    policy); the experiment's own steps are left as they are."""
    return self._compile(options, task)[0]

  def _compile(self, options: dict, task=None):
    update = self.update if task is None else dataclasses.replace(self.update, task=task)
    return compile_steps(update, self.mesh, self.shardings, compiler_options=options)

  def model_params(self, params):
    """The parameters the model itself takes (LoRA's adapters merged: ``Update.model_params``)."""
    return self.update.model_params(params)

  def init_state(self, loaded: Mapping[str, jax.Array] | None = None) -> TrainState:
    """A fresh state, built under jit and placed by ``self.shardings``; ``loaded`` (flat
    variable names -> arrays) replaces those variables (``create_state``), the optimizer state
    being initialised from the result."""
    init = functools.partial(create_state, self.update, self.tx, self.config.seed)
    return jax.jit(init, out_shardings=self.shardings)(dict(loaded or {}))

  def restore(self, checkpointer, step: int | None = None):
    return checkpointer.restore(
        checkpoint_lib.abstract_like(self.abstract_state, self.shardings), step)

  def evaluate(self, state: TrainState, split: str) -> dict[str, float]:
    """Metrics over every example of ``split`` (padding rows excluded), with the task's
    ``extra_metrics`` at the state's step."""
    outputs = (parallel.to_host(self._eval_step(state, parallel.global_batch(batch, self.mesh)))
               for batch in self.pipeline.eval_batches(split))
    return summarize_split(self.update, outputs, int(state.step))


def build_task(config: Any, spec) -> Any:
  """The task ``config`` names, with the finished runs it reads opened (``Task.open_runs``, e.g.
  a distillation teacher) and, with ``model.quantization``, its forward pass quantized
  (``deepflow.qat``): every place that builds a task from a config goes through here."""
  task = TASKS.get(config.task.name)(config, spec)
  task.open_runs(Experiment.from_workdir)
  return qat.quantization_aware(task, config)


def summarize_split(update: Update, outputs: Iterable[Mapping[str, Any]], step: int
                    ) -> dict[str, float]:
  """A split's metrics from its eval steps' outputs on the host (per-example values and the
  mask): the real rows' values concatenated and reduced by the task's ``summarize``, with the
  update's ``extra_metrics`` at ``step``."""
  chunks = []
  for out in outputs:
    out = dict(out)
    mask = np.asarray(out.pop(MASK)) > 0
    chunks.append({k: np.asarray(v)[mask] for k, v in out.items()})
  metrics = update.task.summarize({k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]})
  return {**metrics, **update.extra_metrics(step)}


@dataclasses.dataclass(frozen=True)
class RunSource:
  """Which run, and which checkpoint of it, a command reads: what ``explain``, ``sample`` and
  the exports take instead of repeating (workdir, overrides, checkpoint) in each signature."""
  workdir: str
  overrides: tuple[str, ...] = ()  # 'KEY=VALUE' changes to its config, e.g. data.data_dir=...
  checkpoint: str | int = DEFAULT_CHECKPOINT

  @classmethod
  def of(cls, run: RunSource | str) -> RunSource:
    """``run`` itself, or the default checkpoint of the run in the directory ``run``."""
    return run if isinstance(run, RunSource) else cls(run)

  def open(self) -> Restored:
    """The run reopened: ``Experiment.from_workdir`` of these fields."""
    return Experiment.from_workdir(self.workdir, self.overrides, checkpoint=self.checkpoint)


class Restored(NamedTuple):
  """A reopened run: the experiment, the restored state, its step, and which checkpoint it is
  ('best', 'latest' or 'step')."""
  experiment: Experiment
  state: TrainState
  step: int
  checkpoint: str


def _open_checkpoints(workdir: str, which: str | int) -> tuple[checkpoint_lib.Checkpointer,
                                                                str | int]:
  """A read-only Checkpointer of the directory ``which`` names, and ``which`` itself, resolved:
  'best' is ``workdir/best`` when early stopping saved a state there, else 'latest'."""
  if which == "best":
    best = epath.Path(workdir) / BEST_DIR
    if (best / "checkpoints").is_dir():
      checkpointer = checkpoint_lib.Checkpointer(str(best), read_only=True)
      if checkpointer.latest_step() is not None:
        return checkpointer, which
      checkpointer.close()  # stopped before its first evaluation: nothing kept yet
    which = "latest"  # no early stopping: the run's result is its latest checkpoint
  return checkpoint_lib.Checkpointer(workdir, read_only=True), which


def parse_checkpoint(value: str | int) -> str | int:
  """'best', 'latest' or a step number (an int, or its digits as text)."""
  if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
    return value
  text = str(value).strip()
  if text in CHECKPOINTS:
    return text
  if text.isdigit():
    return int(text)
  raise ConfigError(f"--checkpoint must be best, latest or a step number, got {value!r}")
