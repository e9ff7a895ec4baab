"""Distilled vs label-trained student at the same step budget, over seeds (side by side).

The student of experiments/digits_distill.py is trained twice per seed, as the experiment says
(distilled from the teacher run ``task.teacher``) and from its labels alone
(``task.name='classification'``), everything else equal; prints each test accuracy and the mean
and spread (min..max, standard deviation) of each. The teacher run must exist: train it first
with the experiment's documented command.

    python benchmarks/distill_vs_labels.py [--seeds 0 1 2] [--teacher runs/digits_resnet]
"""
from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from benchmarks.dp_step import cpu_name
from deepflow import config as config_lib
from deepflow.train import loop
from tests.helpers import experiment

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def student_config(seed: int, teacher: str | None):
  """The experiment's student at ``seed``: distilled from ``teacher``, or from labels (None)."""
  config = experiment("digits_distill")[1].get_config()
  config.seed = seed
  config.train.progress = False
  if teacher is None:
    config.task = dict(name="classification")
  else:
    config.task.teacher = teacher
  return config_lib.finalize(config)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--teacher", default=os.path.join(ROOT, "runs", "digits_resnet"))
  args = parser.parse_args()
  results = {"distilled": [], "labels": []}
  with tempfile.TemporaryDirectory() as root:
    for seed in args.seeds:
      for kind, teacher in (("distilled", args.teacher), ("labels", None)):
        metrics = loop.train_and_evaluate(student_config(seed, teacher),
                                          os.path.join(root, f"{kind}_{seed}"))
        results[kind].append(metrics["accuracy"])
        print(f"seed {seed} {kind:9s} test accuracy {metrics['accuracy']:.4f}", flush=True)
  print(f"machine: {cpu_name()}, {os.cpu_count()} cores; load {os.getloadavg()}")
  for kind, accuracies in results.items():
    a = np.asarray(accuracies)
    print(f"{kind:9s} mean {a.mean():.4f}  min..max {a.min():.4f}..{a.max():.4f}  "
          f"std {a.std():.4f}  ({len(a)} seeds)")


if __name__ == "__main__":
  main()
