"""A student CNN 12.8x smaller than the digits ResNet (13,706 vs 174,970 parameters), distilled
from a trained ResNet teacher run on scikit-learn's 8x8 handwritten digits (bundled, offline).

Train the teacher once, then the student (``task.teacher`` is the teacher's run directory):

  deepflow train --config experiments/digits_resnet.py --workdir runs/digits_resnet
  deepflow train --config experiments/digits_distill.py --workdir runs/digits_distill

``benchmarks/distill_vs_labels.py`` trains this student distilled and from labels alone (the
task section replaced by ``dict(name='classification')``, all else equal) over three seeds. Measured (2-core x86_64 CPU, 3000 steps
of 64, seeds 0-2): distilled 0.9917 mean test accuracy (0.9889..0.9944), labels alone 0.9880
(0.9806..0.9917); the teacher 0.9972.
"""
from deepflow.config import base_config

TEACHER = "runs/digits_resnet"


def get_config():
  config = base_config()
  config.model = dict(name="cnn", features=(16, 32), dense=(64,))
  config.task = dict(name="distillation", teacher=TEACHER, temperature=4.0, hard_weight=0.1)
  config.data.source = "bundled:digits"
  config.data.transforms = [dict(name="standardize"), dict(name="random_crop", padding=1)]
  config.data.batch_size = 64
  config.data.eval_batch_size = 120
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 2e-3
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 50
  config.train.steps = 3000
  config.train.eval_every = 1000
  config.train.checkpoint_every = 1000
  return config
