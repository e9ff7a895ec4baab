"""Training: state, pure steps, the experiment, the loop, checkpoints and metric writers.

The exceptions load eagerly (the CLI catches them around every command, ``predict`` included);
the rest on first use, so importing them costs nothing of the training stack."""
from deepflow.train.errors import NonFiniteLossError, Preempted  # noqa: F401

# What every command that reads a run takes as ``--checkpoint`` (``Experiment.from_workdir``):
# 'best' (early stopping's best, else the latest), 'latest', or a step number.
CHECKPOINTS = ("best", "latest")
DEFAULT_CHECKPOINT = "best"

_LAZY = {"Experiment": "deepflow.train.experiment", "train_and_evaluate": "deepflow.train.loop",
         "TrainState": "deepflow.train.state"}


def __getattr__(name: str):
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'deepflow.train' has no attribute {name!r}")
