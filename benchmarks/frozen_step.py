"""Frozen parameters left undifferentiated vs differentiated and then discarded: one run.

Each setting is an experiment file with parameters frozen (``optimizer.freeze``); it is built
twice with the same config, state, batches and optimizer: as deepflow trains it (gradients of
the trained parameters only, ``Partition.split``) and as it used to (``Partition.split`` keeping
every parameter, so the frozen ones' gradients are computed, and under DP-SGD enter the clipping
norms, before the optimizer's ``set_to_zero`` drops them). Both steps are compiled first, then
timed over ``--repeats`` windows of ``--steps`` steps, interleaved (a noisy neighbour slows both
alike); the median window counts. The compiled flops come from XLA's cost analysis.

For a DP-SGD setting it also prints what clipping sees on one batch: the mean per-example norm
that enters it, the fraction of examples clipped and the norm of the noise-free clipped mean
gradient of the trained parameters (the signal; the noise added to it is the same in both).

    python benchmarks/frozen_step.py [--steps 20] [--repeats 7] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile

import jax
import numpy as np
import optax

import deepflow
from deepflow import parallel
from deepflow.optim.partition import Partition
from deepflow.train.experiment import Experiment
from deepflow.train.step import gradient_fn
from dp_step import ROOT, machine, time_rounds  # noqa: E402  (the script's directory)

SETTINGS = {
    "resnet_head": ("digits_resnet.py", ["optimizer.freeze='^(?!head/)'"]),
    "finetune_probe": ("digits_finetune.py", ["model.init_from=''", "optimizer.freeze=^backbone/",
                                              "optimizer.lr_multipliers=[]"]),
    "text_lora": ("text_lora.py", ["model.init_from=''"]),
    "dp_mlp_head": ("private_digits.py", ["model.hidden=(256,256)",
                                          "optimizer.freeze='^Dense_[01]/'",
                                          "privacy.target_epsilon=0",
                                          "privacy.noise_multiplier=1.0"]),
}
WAYS = ("trained_only", "all_then_dropped")


def build(path: str, overrides: list[str], way: str, workdir: str):
  """A compiled train step, a fresh state and a fixed list of batches; ``all_then_dropped``
  differentiates every parameter, as deepflow did before frozen ones were left out."""
  config = deepflow.load_config(os.path.join(ROOT, "experiments", path), overrides)
  exp = Experiment(config, workdir)
  if way == "all_then_dropped":
    exp.partition.split = lambda params: (params, {})
  iterator = exp.pipeline.train_iterator()
  batches = [parallel.global_batch(next(iterator), exp.mesh) for _ in range(8)]
  state = exp.init_state()
  exp.train_step = exp.train_step.lower(state, batches[0]).compile()  # compiled once, timed
  flops = exp.train_step.cost_analysis()["flops"]
  state, metrics = exp.train_step(state, batches[0])
  jax.block_until_ready(metrics)
  return [exp, state, batches], flops


def clipping_seen(exp, state, batch) -> dict[str, float]:
  """Per-example norm entering clipping, clipped fraction and the noise-free clipped mean
  gradient's norm over the trained parameters, on one batch."""
  noiseless = dataclasses.replace(exp.update, privacy=dataclasses.replace(
      exp.update.privacy, noise_multiplier=0.0))
  grads, _, metrics = jax.jit(gradient_fn(noiseless))(state.params, state.model_state, batch,
                                                      jax.random.key(0))
  trained, _ = Partition.split(exp.partition, grads)  # the class's split, never the patched one
  return {"example norm": float(metrics["privacy/example_grad_norm"]),
          "clipped": float(metrics["privacy/clipped_fraction"]),
          "signal": float(optax.global_norm(trained))}


def compare(name: str, steps: int, repeats: int) -> None:
  path, overrides = SETTINGS[name]
  with tempfile.TemporaryDirectory() as tmp:
    runs, flops = {}, {}
    for way in WAYS:
      runs[way], flops[way] = build(path, overrides, way, os.path.join(tmp, way))
    times = time_rounds(runs, repeats, steps)
    median = {way: float(np.median(t)) for way, t in times.items()}
    exp = runs[WAYS[0]][0]
    trained, total = exp.partition.count(runs[WAYS[0]][1].params)
    print(f"\n{name}: {path} {' '.join(overrides)}; batch {exp.config.data.batch_size}, "
          f"{trained:,} of {total:,} parameters trained")
    for way in WAYS:
      print(f"  {way:>17}: {1e3 * median[way]:8.3f} ms/step (median of {repeats} x {steps}), "
            f"{flops[way] / 1e6:9.2f} MFLOP/step")
    print(f"  step time all/trained: {median[WAYS[1]] / median[WAYS[0]]:.2f}x, "
          f"flops all/trained: {flops[WAYS[1]] / flops[WAYS[0]]:.2f}x")
    if exp.update.privacy is not None:
      for way, (run_exp, state, batches) in runs.items():
        seen = clipping_seen(run_exp, state, batches[0])
        print(f"  {way:>17}: " + ", ".join(f"{k} {v:.4g}" for k, v in seen.items()))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--only", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
  args = parser.parse_args(argv)
  print(f"machine: {machine()}; load {os.getloadavg()}")
  for name in args.only:
    compare(name, args.steps, args.repeats)
  print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
  main()
