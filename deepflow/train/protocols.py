"""What the loop's policies use of an experiment, declared: early stopping restores and evaluates
a state, autotuning recompiles the steps. They take any object with these members (an
``Experiment`` is one) and import no ``experiment`` module, which imports them: the import graph
keeps no circle, and a test can hand them a small stand-in."""
from __future__ import annotations

from typing import Any, Callable, Protocol

from deepflow.train.checkpoint import Checkpointer
from deepflow.train.state import TrainState


class Evaluating(Protocol):
  """Restores a state from a checkpointer and evaluates it (``early_stopping.BestKeeper``)."""
  config: Any

  def restore(self, checkpointer: Checkpointer, step: int | None = None
              ) -> tuple[TrainState, Any, int]:
    """(state, data iterator state, step) of ``step`` (default: the latest) in ``checkpointer``."""

  def evaluate(self, state: TrainState, split: str) -> dict[str, float]:
    """Metrics of ``state`` over every example of ``split``."""


class Compiling(Protocol):
  """Compiles its train and eval steps with XLA options (``tuning.autotune``, ``apply_record``)."""
  workdir: str | None
  base_options: dict        # deepflow's per-platform defaults and train.xla_options
  compiler_options: dict    # those the steps were compiled with
  shardings: Any            # of the train state

  def compiled_train_step(self, options: dict, task: Any = None) -> Callable:
    """A train step compiled with ``options``, the experiment's own left as they are."""

  def use_compiler_options(self, options: dict, train_step: Callable | None = None) -> dict:
    """Recompiles the steps with ``options`` (``train_step``: that step, already compiled)."""
