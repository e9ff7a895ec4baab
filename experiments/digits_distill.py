"""A student CNN 12.8x smaller than the digits ResNet (13,706 vs 174,970 parameters), distilled
from a trained ResNet teacher run on scikit-learn's 8x8 handwritten digits (bundled, offline).

Train the teacher once, then the student (``task.teacher`` is the teacher's run directory):

  deepflow train --config experiments/digits_resnet.py --workdir runs/digits_resnet
  deepflow train --config experiments/digits_distill.py --workdir runs/digits_distill

The same student from labels alone is ``--config.task.name=classification`` with
``task.teacher``, ``temperature`` and ``hard_weight`` dropped; ``benchmarks/distill_vs_labels.py``
trains both at the same step budget over three seeds (measured numbers: README, "Distillation").
"""
from deepflow.config import base_config

TEACHER = "runs/digits_resnet"


def get_config():
  config = base_config()
  config.model = dict(name="cnn", features=(16, 32), dense=(64,))
  config.task = dict(name="distillation", teacher=TEACHER, temperature=4.0, hard_weight=0.3)
  config.data.source = "bundled:digits"
  config.data.transforms = [dict(name="standardize"), dict(name="random_crop", padding=1)]
  config.data.batch_size = 64
  config.data.eval_batch_size = 120
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 2e-3
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 20
  config.train.steps = 300
  config.train.eval_every = 300
  config.train.checkpoint_every = 300
  return config
