"""deepflow: experiment files in, jit-compiled data-parallel training out.

    import deepflow
    config = deepflow.load_config('experiments/digits_cnn.py', ['train.steps=200'])
    metrics = deepflow.train_and_evaluate(config, 'runs/digits_cnn')
"""
from deepflow.registry import ConfigError  # noqa: F401

__version__ = "0.1.0"

# The public names load on first use, so that a part of deepflow pays only for what it imports:
# ``deepflow predict`` needs JAX and numpy, not the training stack (optax, orbax, grain, flax,
# TFDS) that ``train_and_evaluate`` brings; ``deepflow.privacy`` loads dp-accounting and
# ``deepflow.explain`` matplotlib.
_LAZY_NAMES = {"base_config": "deepflow.config", "load_config": "deepflow.config",
               "train_and_evaluate": "deepflow.train.loop",
               "load_pretrained": "deepflow.hf.load"}
_LAZY_MODULES = ("config", "explain", "privacy")


def __getattr__(name: str):
  import importlib
  if name in _LAZY_NAMES:
    return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
  if name in _LAZY_MODULES:
    return importlib.import_module(f"deepflow.{name}")
  raise AttributeError(f"module 'deepflow' has no attribute {name!r}")
