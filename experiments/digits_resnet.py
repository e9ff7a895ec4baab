"""A small ResNet (three stages of two basic blocks, batch norm) on scikit-learn's 8x8
handwritten digits (bundled, offline), with random one-pixel shifts as augmentation.

Run:  deepflow train --config experiments/digits_resnet.py --workdir runs/digits_resnet
Measured (2-core x86_64 CPU; 1000 steps of 64, 28 s including compilation): test accuracy 0.9917
(357 of 360 test digits).
"""
from deepflow.config import base_config


def get_config():
  config = base_config()
  config.model = dict(name="resnet", stage_sizes=(2, 2, 2), width=16)
  config.data.source = "bundled:digits"
  config.data.transforms = [dict(name="standardize"), dict(name="random_crop", padding=1)]
  config.data.batch_size = 64
  config.data.eval_batch_size = 120
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 2e-3
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 50
  config.optimizer.weight_decay = 5e-4
  config.train.steps = 1000
  config.train.eval_every = 500
  config.train.checkpoint_every = 500
  return config
