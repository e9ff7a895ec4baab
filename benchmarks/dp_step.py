"""DP-SGD's train step vs the ordinary one: same model, batch, optimizer and device, one run.

Both steps are deepflow's real jitted train step (``Experiment.train_step``), built from the same
experiment file (default: experiments/private_digits.py) with ``privacy.enabled`` on and off; the
DP step adds per-example gradients (``vmap``), per-example clipping and Gaussian noise. Each is
compiled first, then timed over ``--repeats`` windows of ``--steps`` steps, interleaved (so a
noisy neighbour slows both alike); the median window counts.

    python benchmarks/dp_step.py [--config experiments/private_digits.py] [--steps 100]
                                 [--repeats 7] [KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import jax
import numpy as np

import deepflow
from deepflow import parallel
from deepflow.train.experiment import Experiment

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def cpu_name() -> str:
  """The CPU's model name where Linux says it, else what ``platform`` knows."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def build(path: str, overrides: list[str], private: bool, workdir: str):
  """A compiled train step, a fresh state and a fixed list of batches for one setting."""
  config = deepflow.load_config(path, [*overrides, f"privacy.enabled={private}",
                                       "privacy.target_epsilon=0", "privacy.noise_multiplier=1.0"])
  exp = Experiment(config, workdir)
  iterator = exp.pipeline.train_iterator()
  batches = [parallel.global_batch(next(iterator), exp.mesh) for _ in range(8)]
  state = exp.init_state()
  state, metrics = exp.train_step(state, batches[0])  # compile
  jax.block_until_ready(metrics)
  return exp, state, batches


def time_window(exp, state, batches, steps: int):
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = exp.train_step(state, batches[i % len(batches)])
  jax.block_until_ready(metrics)
  return state, (time.perf_counter() - start) / steps


def time_rounds(runs: dict[str, list], repeats: int, steps: int) -> dict[str, list[float]]:
  """Seconds a step of each run ([experiment, state, batches], its state advanced in place) in
  ``repeats`` rounds of one window each, interleaved so that a noisy neighbour slows all alike."""
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      run[1], seconds = time_window(*run, steps)
      times[name].append(seconds)
  return times


def step_parser(doc: str, experiment: str, steps: int) -> argparse.ArgumentParser:
  """The arguments of a script timing steps of one experiment's variants: ``--config`` (default
  experiments/``experiment``), ``--steps`` per timed window, ``--repeats`` and overrides."""
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--config", default=os.path.join(ROOT, "experiments", experiment))
  parser.add_argument("--steps", type=int, default=steps)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides for every variant")
  return parser


def machine() -> str:
  """The CPU, its cores, JAX and the devices the steps run on."""
  return (f"{cpu_name()}, {os.cpu_count()} CPUs, jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind} x{jax.device_count()}")


def main(argv=None):
  args = step_parser(__doc__, "private_digits.py", 100).parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    runs = {name: list(build(args.config, args.overrides, private, os.path.join(tmp, name)))
            for name, private in (("ordinary", False), ("dp", True))}
    times = time_rounds(runs, args.repeats, args.steps)
  config = runs["dp"][0].config
  median = {name: float(np.median(t)) for name, t in times.items()}
  print(f"machine: {machine()}")
  print(f"model: {config.model.to_dict()}, batch {config.data.batch_size}, "
        f"{config.optimizer.name}")
  for name, seconds in median.items():
    print(f"{name:>8} step: {1e3 * seconds:.3f} ms (median of {args.repeats} x {args.steps})")
  ratio = median["dp"] / median["ordinary"]
  print(f"DP / ordinary step time: {ratio:.2f}x")
  return ratio


if __name__ == "__main__":
  main()
