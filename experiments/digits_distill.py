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
import os

import deepflow

TEACHER = "runs/digits_resnet"
DIGITS_RESNET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_resnet.py")


def get_config():
  """The teacher's experiment (data, augmentation, optimizer) with a small CNN, no weight decay,
  three times the steps and the distillation task."""
  config = deepflow.load_config(DIGITS_RESNET)
  with config.unlocked():
    config.model = dict(name="cnn", features=(16, 32), dense=(64,))
    config.task = dict(name="distillation", teacher=TEACHER, temperature=4.0, hard_weight=0.1)
  config.optimizer.weight_decay = 0.0
  config.train.steps = 3000
  config.train.eval_every = 1000
  config.train.checkpoint_every = 1000
  return config
