"""deepflow: experiment files in, jit-compiled data-parallel training out.

    import deepflow
    config = deepflow.load_config('experiments/digits_cnn.py', ['train.steps=200'])
    metrics = deepflow.train_and_evaluate(config, 'runs/digits_cnn')
"""
from deepflow.config import base_config, load_config  # noqa: F401
from deepflow.registry import ConfigError  # noqa: F401
from deepflow.train import train_and_evaluate  # noqa: F401

__version__ = "0.1.0"

# Submodules with heavier dependencies load on first use: ``deepflow.privacy.compute_epsilon``
# (dp-accounting) and ``deepflow.explain.explain`` (matplotlib) without a cost to every import.
_LAZY = ("explain", "privacy")


def __getattr__(name: str):
  if name in _LAZY:
    import importlib
    return importlib.import_module(f"deepflow.{name}")
  raise AttributeError(f"module 'deepflow' has no attribute {name!r}")
