"""deepflow's training loop vs a minimal hand-written jax.jit + optax loop, side by side.

Same model (the digits CNN of experiments/digits_cnn.py), same batch size, same optimizer, same
data (bundled digits), same device. The baseline is the least a researcher could write: numpy
batches from an in-memory array, one jitted step, no logging, no checkpoints. deepflow runs its
real loop (Grain pipeline, sharded global batches, metrics, progress bar off, one checkpoint at
the end). Both are timed over the same steady-state windows (compilation excluded).

A second baseline folds its dropout key inside the jitted step instead of eagerly before each
call (one eager op a step less). The machine is shared, so its load drifts within a run: each
repeat times all three, deepflow alternately first and last, and the ratio reported is the
median of the repeats' own ratios (with their range and the load average before and after),
beside the ratio of the medians.

    python benchmarks/overhead.py [--steps 600] [--window 100] [--repeats 5]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import tempfile
import time

import jax
import numpy as np
import optax

import deepflow
from deepflow.data.pipeline import INPUTS, TARGETS, Pipeline
from deepflow.registry import TASKS
from deepflow.train import tuning
from deepflow.train.update import build_update


def deepflow_steps_per_sec(config, workdir: str) -> float:
  deepflow.train_and_evaluate(config, workdir)
  records = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
  windows = [r["steps_per_sec"] for r in records if r["split"] == "train"][1:]  # skip compile
  return float(np.median(windows))


def baseline_steps_per_sec(config, steps: int, window: int, key_in_step: bool = False) -> float:
  """The hand-written loop's steps/s; its dropout key is folded from the step number eagerly
  before each call, or (``key_in_step``) inside the jitted step, which saves an eager op a step."""
  pipeline = Pipeline(config)
  task = TASKS.get(config.task.name)(config, pipeline.spec)
  tx = build_update(config, task, config.train.steps).tx
  params, _ = task.init(jax.random.PRNGKey(0))
  opt_state = tx.init(params)
  train = {k: v for k, v in next(pipeline.eval_batches(config.data.train_split)).items()}
  x_all, y_all = train[INPUTS], train[TARGETS].astype(np.int32)
  model = task.model

  # The same XLA options as deepflow's steps (its CPU default puts convolutions in Eigen), so
  # the ratio measures the loop, not the kernels.
  @functools.partial(jax.jit, compiler_options=tuning.step_options(config.train.xla_options,
                                                                   jax.default_backend())
                     or None)
  def step(params, opt_state, x, y, key):
    if key_in_step:
      key = jax.random.fold_in(jax.random.PRNGKey(0), key)  # ``key`` is the step number
    def loss_fn(p):
      logits = model.apply({"params": p}, x, train=True, rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(0)
  key = jax.random.PRNGKey(0)
  b = config.data.batch_size
  rates = []
  start = time.perf_counter()
  for i in range(steps):
    idx = rng.integers(0, len(x_all), b)
    params, opt_state, loss = step(params, opt_state, x_all[idx], y_all[idx],
                                   i if key_in_step else jax.random.fold_in(key, i))
    if (i + 1) % window == 0:
      loss.block_until_ready()
      now = time.perf_counter()
      rates.append(window / (now - start))
      start = now
  return float(np.median(rates[1:]))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--window", type=int, default=100)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  overrides = [f"train.steps={args.steps}", f"train.log_every={args.window}",
               "train.eval_every=0", "train.checkpoint_every=0", "train.progress=False",
               "data.eval_batch_size=1440"]
  config = deepflow.load_config("experiments/digits_cnn.py", overrides)
  ours, base, tight = [], [], []
  load = os.getloadavg()[0]

  def run_deepflow():
    with tempfile.TemporaryDirectory() as workdir:
      ours.append(deepflow_steps_per_sec(config, workdir))

  def run_baselines():
    base.append(baseline_steps_per_sec(config, args.steps, args.window))
    tight.append(baseline_steps_per_sec(config, args.steps, args.window, key_in_step=True))
  for r in range(args.repeats):
    for run in ((run_deepflow, run_baselines) if r % 2 == 0 else (run_baselines, run_deepflow)):
      run()
    print(f"repeat {r}: deepflow {ours[-1]:.1f} steps/s, baseline {base[-1]:.1f} steps/s "
          f"({ours[-1] / base[-1]:.3f}), baseline with the key folded in the step "
          f"{tight[-1]:.1f} steps/s ({ours[-1] / tight[-1]:.3f})", flush=True)
  print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"devices: {jax.devices()[0].platform} x{jax.device_count()}; load average {load:.2f} "
        f"-> {os.getloadavg()[0]:.2f}; batch {config.data.batch_size}, digits CNN")
  for name, other in (("hand-written", base), ("hand-written, key folded in the step", tight)):
    ratios = np.array(ours) / np.array(other)
    print(f"deepflow / {name} steps/s: {np.median(ratios):.3f} (median of {args.repeats} "
          f"repeats' ratios, range {ratios.min():.3f}-{ratios.max():.3f}); ratio of the medians "
          f"{np.median(ours) / np.median(other):.3f} (deepflow {np.median(ours):.1f}, baseline "
          f"{np.median(other):.1f} steps/s)")


if __name__ == "__main__":
  main()
