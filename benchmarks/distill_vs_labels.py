"""Distilled vs label-trained student at the same step budget, over seeds (side by side).

The student of experiments/digits_distill.py (or ``--experiment text_distill``, a language
model) is trained twice per seed, as the experiment says (distilled from the teacher run
``task.teacher``) and from its labels alone (``task.name='classification'``, or
'language_model'), everything else equal; prints each test accuracy (perplexity) and the mean
and spread (min..max, standard deviation) of each. The teacher run must exist: train it first
with the experiment's documented command.

    python benchmarks/distill_vs_labels.py [--seeds 0 1 2] [--experiment digits_distill]
                                           [--teacher runs/digits_resnet]
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
# experiment -> (its student's task from labels alone, the metric compared, its teacher's run)
EXPERIMENTS = {"digits_distill": ("classification", "accuracy", "digits_resnet"),
               "text_distill": ("language_model", "perplexity", "text_transformer")}


def student_config(seed: int, teacher: str | None, name: str = "digits_distill"):
  """The experiment's student at ``seed``: distilled from ``teacher``, or from labels (None)."""
  config = experiment(name)[1].get_config()
  config.seed = seed
  config.train.progress = False
  if teacher is None:
    config.task = dict(name=EXPERIMENTS[name][0])
  else:
    config.task.teacher = teacher
  return config_lib.finalize(config)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--experiment", choices=sorted(EXPERIMENTS), default="digits_distill")
  parser.add_argument("--teacher", help="the teacher's run (default: runs/ of the experiment's "
                      "documented teacher)")
  args = parser.parse_args()
  _, metric, teacher_run = EXPERIMENTS[args.experiment]
  teacher = args.teacher or os.path.join(ROOT, "runs", teacher_run)
  results = {"distilled": [], "labels": []}
  with tempfile.TemporaryDirectory() as root:
    for seed in args.seeds:
      for kind, source in (("distilled", teacher), ("labels", None)):
        metrics = loop.train_and_evaluate(student_config(seed, source, args.experiment),
                                          os.path.join(root, f"{kind}_{seed}"))
        results[kind].append(metrics[metric])
        print(f"seed {seed} {kind:9s} test {metric} {metrics[metric]:.4f}", flush=True)
  print(f"machine: {cpu_name()}, {os.cpu_count()} cores; load {os.getloadavg()}")
  for kind, values in results.items():
    a = np.asarray(values)
    print(f"{kind:9s} mean {a.mean():.4f}  min..max {a.min():.4f}..{a.max():.4f}  "
          f"std {a.std():.4f}  ({len(a)} seeds)")


if __name__ == "__main__":
  main()
