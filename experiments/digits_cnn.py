"""A small CNN on scikit-learn's 8x8 handwritten digits (bundled, offline).

Run:  deepflow train --config experiments/digits_cnn.py --workdir runs/digits_cnn
Measured (2-core x86_64 CPU, 1000 steps of 64, about 25 s including compilation): test
accuracy 0.9944 (358 of 360 test digits).
"""
from deepflow.config import base_config


def get_config():
  config = base_config()
  config.model = dict(name="cnn", features=(32, 64), dense=(128,), dropout=0.2)
  config.data.source = "bundled:digits"
  config.data.batch_size = 64
  config.data.eval_batch_size = 120
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 2e-3
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 50
  config.optimizer.weight_decay = 1e-4
  config.train.steps = 1000
  config.train.eval_every = 250
  config.train.checkpoint_every = 250
  return config
