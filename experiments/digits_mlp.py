"""A feedforward network (MLP) on scikit-learn's 8x8 handwritten digits (bundled, offline).

The activation is one override away, to compare them on the same data and budget:

  deepflow train --config experiments/digits_mlp.py --workdir runs/digits_mlp_relu
  deepflow train --config experiments/digits_mlp.py --workdir runs/digits_mlp_tanh \\
      --config.model.activation=tanh
  deepflow train --config experiments/digits_mlp.py --workdir runs/digits_mlp_sigmoid \\
      --config.model.activation=sigmoid

Measured (2-core x86_64 CPU, 1500 steps of 64): test accuracy relu 0.9806, tanh 0.9806,
sigmoid 0.9722.
"""
from deepflow.config import base_config


def get_config():
  config = base_config()
  config.model = dict(name="mlp", hidden=(256, 128), activation="relu", dropout=0.1)
  config.data.source = "bundled:digits"
  config.data.batch_size = 64
  config.data.eval_batch_size = 120
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "cosine"
  config.train.steps = 1500
  config.train.eval_every = 500
  config.train.checkpoint_every = 500
  return config
