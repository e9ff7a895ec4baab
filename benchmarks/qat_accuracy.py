"""Float vs post-training vs quantization-aware integer models: digits CNN test accuracy.

experiments/digits_cnn.py is trained as it is (float), then quantized after training
(``deepflow.quantize.evaluate``: int8 and int4 weights, int8 activations, qwix) and trained
again with ``model.quantization`` = int8 and int4 (``deepflow.qat``), same seed and step budget;
each QAT run's accuracy is its own final evaluation, which computes the integer model its export
writes. Prints each seed's accuracies, their means with the spread (min..max) over seeds, and
the QAT runs' training time relative to the float run's (same process, one after the other).

    python benchmarks/qat_accuracy.py [--seeds 0 1 2] [--steps 1000] [--model digits_cnn]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from benchmarks.dp_step import cpu_name
from deepflow import config as config_lib, quantize
from deepflow.train import loop
from deepflow.train.experiment import Experiment
from tests.helpers import experiment

COLUMNS = ("float", "ptq_int8", "qat_int8", "ptq_int4", "qat_int4")


def config_of(name: str, seed: int, steps: int, quantization: str = ""):
  config = experiment(name)[1].get_config()
  config.seed, config.train.progress = seed, False
  config.train.steps = steps
  config.train.eval_every = config.train.checkpoint_every = steps
  config.model.quantization = quantization
  return config_lib.finalize(config)


def train(config, workdir: str) -> tuple[float, float]:
  """(test accuracy, seconds of training)."""
  start = time.perf_counter()
  accuracy = loop.train_and_evaluate(config, workdir)["accuracy"]
  return accuracy, time.perf_counter() - start


def one_seed(name: str, seed: int, steps: int, root: str) -> tuple[dict, dict]:
  """The accuracies of every column, and the QAT runs' training time / the float run's."""
  workdir = os.path.join(root, f"{name}_{seed}")
  accuracy, times = {}, {}
  accuracy["float"], times["float"] = train(config_of(name, seed, steps), workdir)
  exp, state, _, _ = Experiment.from_workdir(workdir)
  for scheme in ("int8", "int4"):
    accuracy[f"ptq_{scheme}"] = quantize.evaluate(exp, state, "test", scheme)["accuracy"]
    accuracy[f"qat_{scheme}"], times[scheme] = train(
        config_of(name, seed, steps, scheme), f"{workdir}_{scheme}")
  return accuracy, {scheme: times[scheme] / times["float"] for scheme in ("int8", "int4")}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--model", default="digits_cnn")
  args = parser.parse_args()
  rows = []
  with tempfile.TemporaryDirectory() as root:
    for seed in args.seeds:
      accuracy, slowdown = one_seed(args.model, seed, args.steps, root)
      rows.append(accuracy)
      print(f"seed {seed}: " + "  ".join(f"{c} {accuracy[c]:.4f}" for c in COLUMNS) +
            f"  (QAT training time / float: int8 {slowdown['int8']:.2f}x, int4 "
            f"{slowdown['int4']:.2f}x)", flush=True)
  print(f"{args.model}, {args.steps} steps, mean over seeds {args.seeds} (min..max):")
  for column in COLUMNS:
    values = np.array([row[column] for row in rows])
    print(f"  {column:9s} {values.mean():.4f} ({values.min():.4f}..{values.max():.4f})")
  print(f"machine: {cpu_name()}, {os.cpu_count()} cores; load {os.getloadavg()}")


if __name__ == "__main__":
  main()
