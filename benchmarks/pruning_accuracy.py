"""Dense vs 80% magnitude-pruned: test accuracy of the digits MLP and CNN, side by side.

Each experiment (experiments/digits_mlp.py, experiments/digits_cnn.py) is trained as it is and
with the ``pruning`` regularizer (the hidden layers' kernels to ``--sparsity``; the input
convolution and the output layer stay dense, as in Zhu & Gupta; ``--all`` prunes every kernel),
Zhu & Gupta's schedule from 5% to 40% of the steps (``--schedule``; ending well before training
ends leaves 60% of the steps to fine-tune the pruned network, as they recommend), masks every
``--frequency`` steps, same seed and step budget; prints both accuracies, the difference in points, the pruned kernels'
measured sparsity and the bytes of each run's exported weights (``deepflow export``'s
weights.npz, deflated when pruned).

    python benchmarks/pruning_accuracy.py [--sparsity 0.8] [--frequency 25] [--seed 0] [--all]
                                          [--schedule 0.05 0.4] [--models digits_mlp digits_cnn]
"""
from __future__ import annotations

import argparse
import os
import re
import tempfile

import jax
import numpy as np

from benchmarks.dp_step import cpu_name
from deepflow import config as config_lib, export
from deepflow.pytree import flatten
from deepflow.train import loop
from deepflow.train.experiment import Experiment
from tests.helpers import experiment


HIDDEN = {"digits_mlp": r"Dense_[01]/kernel$", "digits_cnn": r"(Conv_1|Dense_0)/kernel$"}


def config_of(name: str, seed: int, pruning: dict | None, schedule=(0.05, 0.4)):
  """The experiment at ``seed``, pruned when ``pruning`` is given: the schedule runs over the
  ``schedule`` fractions (start, end) of its steps."""
  config = experiment(name)[1].get_config()
  config.seed, config.train.progress = seed, False
  if pruning is not None:
    steps = config.train.steps
    config.regularizers = [*config.regularizers, dict(
        name="pruning", start_step=int(steps * schedule[0]), end_step=int(steps * schedule[1]),
        **pruning)]
  return config_lib.finalize(config)


def kernel_sparsity(workdir: str, pattern: str) -> float:
  params = flatten(jax.device_get(Experiment.from_workdir(workdir).state.params))
  kernels = [x for name, x in params.items() if re.search(pattern, name)]
  return float(sum(np.sum(x == 0) for x in kernels) / sum(x.size for x in kernels))


def weight_bytes(workdir: str, out: str) -> int:
  export.export(workdir, out, platforms=("cpu",))
  return os.path.getsize(os.path.join(out, "weights.npz"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sparsity", type=float, default=0.8)
  parser.add_argument("--frequency", type=int, default=25)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--all", action="store_true", help="prune every kernel")
  parser.add_argument("--schedule", nargs=2, type=float, default=(0.05, 0.4),
                      metavar=("START", "END"), help="the schedule's start and end, as fractions "
                      "of the steps (the rest fine-tunes the pruned network)")
  parser.add_argument("--models", nargs="+", default=list(HIDDEN))
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as root:
    for name in args.models:
      pattern = r"kernel$" if args.all else HIDDEN[name]
      pruning = dict(sparsity=args.sparsity, frequency=args.frequency, params=pattern)
      dense_dir, workdir = os.path.join(root, name), os.path.join(root, f"{name}_pruned")
      dense = loop.train_and_evaluate(config_of(name, args.seed, None), dense_dir)["accuracy"]
      pruned = loop.train_and_evaluate(config_of(name, args.seed, pruning, args.schedule),
                                       workdir)["accuracy"]
      sizes = [weight_bytes(d, d + "_export") for d in (dense_dir, workdir)]
      print(f"{name}: dense {dense:.4f}  pruned {pruned:.4f} ({100 * (pruned - dense):+.2f} "
            f"points) at sparsity {kernel_sparsity(workdir, pattern):.3f} of {pattern}; "
            f"weights.npz {sizes[0]} -> {sizes[1]} bytes", flush=True)
  print(f"machine: {cpu_name()}, {os.cpu_count()} cores; load {os.getloadavg()}")


if __name__ == "__main__":
  main()
