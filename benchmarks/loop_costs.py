"""What the loop's services cost, each measured side by side with its baseline in one run:

1. asynchronous Orbax checkpoints every 50 steps vs no checkpoints (target: <= 5% fewer steps/s);
2. the real input pipeline (Grain, preprocessing, host->device) vs one device-resident batch
   reused every step (target: >= 95% of its steps/s);
3. time to first step (dataset, model init, compilation of the train step, the step itself).

Model: the digits CNN of experiments/digits_cnn.py on bundled digits.

    python benchmarks/loop_costs.py [--steps 600] [--repeats 3]
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
from overhead import deepflow_steps_per_sec


def pipeline_vs_resident(config, steps: int, rounds: int = 3) -> tuple[float, float]:
  """steps/s feeding the step from the pipeline vs from one batch already on the devices,
  alternated over ``rounds`` after a warm-up of each (medians)."""
  with tempfile.TemporaryDirectory() as workdir:
    exp = Experiment(config, workdir)
  state = exp.init_state()
  iterator = exp.pipeline.train_iterator()
  resident = jax.device_put(next(iterator), parallel.batch_sharding(exp.mesh))

  def timed(feed, n):
    nonlocal state
    start = time.perf_counter()
    for _ in range(n):
      state, metrics = exp.train_step(state, feed())
    jax.block_until_ready(metrics)
    return n / (time.perf_counter() - start)

  loader = lambda: parallel.global_batch(next(iterator), exp.mesh)  # noqa: E731
  feeds = {"pipeline": loader, "resident": lambda: resident}
  for feed in feeds.values():
    timed(feed, 50)  # compile, fill the prefetch buffer
  rates = {name: [] for name in feeds}
  for _ in range(rounds):
    for name, feed in feeds.items():
      rates[name].append(timed(feed, steps))
  return float(np.median(rates["pipeline"])), float(np.median(rates["resident"]))


def time_to_first_step(config) -> float:
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    exp = Experiment(config, workdir)
    state = exp.init_state()
    batch = parallel.global_batch(next(exp.pipeline.train_iterator()), exp.mesh)
    state, metrics = exp.train_step(state, batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  base = [f"train.steps={args.steps}", "train.log_every=50", "train.eval_every=0",
          "train.progress=False", "data.eval_batch_size=1440"]
  no_ckpt = deepflow.load_config("experiments/digits_cnn.py", base + ["train.checkpoint_every=0"])
  ckpt = deepflow.load_config("experiments/digits_cnn.py", base + ["train.checkpoint_every=50"])
  ckpt500 = deepflow.load_config("experiments/digits_cnn.py",
                                 base + ["train.checkpoint_every=500", f"train.steps={5 * args.steps}"])
  first = time_to_first_step(no_ckpt)
  rows = {"no checkpoints": [], "checkpoint every 50": [], "checkpoint every 500": [],
          "pipeline": [], "resident": []}
  for _ in range(args.repeats):
    for name, config in (("no checkpoints", no_ckpt), ("checkpoint every 50", ckpt),
                         ("checkpoint every 500", ckpt500)):
      with tempfile.TemporaryDirectory() as workdir:
        rows[name].append(deepflow_steps_per_sec(config, workdir))
    loader, resident = pipeline_vs_resident(no_ckpt, args.steps)
    rows["pipeline"].append(loader)
    rows["resident"].append(resident)
  med = {k: float(np.median(v)) for k, v in rows.items()}
  print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"devices: {jax.devices()[0].platform} x{jax.device_count()}")
  for k, v in med.items():
    print(f"  {k:22s} {v:8.1f} steps/s  (runs: {', '.join(f'{x:.1f}' for x in rows[k])})")
  for every in (50, 500):
    kept = med[f"checkpoint every {every}"] / med["no checkpoints"]
    print(f"checkpointing every {every} steps keeps {kept:.3f} of the steps/s without checkpoints")
  print(f"real input pipeline reaches {med['pipeline'] / med['resident']:.3f} of the steps/s of a "
        f"device-resident batch")
  print(f"time to first step (data, init, compile, step): {first:.2f} s")


if __name__ == "__main__":
  main()
