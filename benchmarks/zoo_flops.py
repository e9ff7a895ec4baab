"""How much of the machine the model zoo uses, each measured side by side with its baseline in one
run:

1. peak: the FLOP/s of a large jitted float32 matmul (N x N by N x N: 2 N^3 FLOPs), the best of
   a few repeats, as the machine's achievable matmul rate;
2. the train steps of experiments/text_transformer.py (character Transformer LM) and
   experiments/digits_vit.py (ViT), each the real jitted step of ``Experiment``: FLOPs per step
   from XLA's cost analysis of the compiled step (``jit(...).lower(...).compile()
   .cost_analysis()['flops']``: forward, backward and optimizer update as XLA counts them),
   times measured steps/s, as a fraction of the peak;
3. the sampler (``deepflow.models.decoding.sample``) on the Transformer LM: generated tokens/s
   with the key/value cache and without it (every step recomputes the whole prefix).

The train steps are fed one device-resident batch, so the numbers are the step's, not the input
pipeline's (benchmarks/loop_costs.py measures that). Untrained weights: speed does not depend
on them.

    python benchmarks/zoo_flops.py [--steps 30] [--peak_size 2048] [--sample_tokens 127]

Measured (x86_64, 2 CPU cores, one JAX CPU device, jax 0.10.2; three runs, load average ~3 from
other jobs): peak 287-300 GFLOP/s; text_transformer step 3.56 GFLOP, 11.7-12.3 steps/s =
14.0-14.9% of peak; digits_vit step 0.98 GFLOP, 30.5-31.7 steps/s = 10.1-10.8% of peak;
sampler (batch 8, 127 new tokens) 36.6k-38.5k tokens/s with the KV cache, 1.72k-1.74k without
(21-22x). A later session on the same machine (load 2.4-2.9): peak 190 GFLOP/s, text_transformer
10.0 steps/s = 18.8%, digits_vit 33.0 steps/s = 17.1%, sampler 50.7k vs 2.2k tokens/s (23.4x):
the matmul peak moves between sessions more than the steps do. Small models on a CPU: much of a step is memory-bound elementwise work (layer norm,
softmax, the optimizer) that the matmul peak does not measure.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp

import deepflow
from deepflow import parallel
from deepflow.models import decoding
from deepflow.train.experiment import Experiment

EXPERIMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "experiments")


def matmul_peak(size: int, repeats: int = 5) -> float:
  """FLOP/s of a jitted (size x size) @ (size x size) float32 matmul, best of ``repeats``."""
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


def train_step_rate(name: str, steps: int) -> tuple[float, float]:
  """(XLA-counted FLOPs per train step, steps/s) of an experiment's jitted train step."""
  config = deepflow.load_config(os.path.join(EXPERIMENTS, f"{name}.py"),
                                ["train.progress=False"])
  with tempfile.TemporaryDirectory() as workdir:
    exp = Experiment(config, workdir)
  state = exp.init_state()
  batch = jax.device_put(next(exp.pipeline.train_iterator()), parallel.batch_sharding(exp.mesh))
  flops = exp.train_step.lower(state, batch).compile().cost_analysis()["flops"]
  for _ in range(3):  # compile and warm up
    state, metrics = exp.train_step(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = exp.train_step(state, batch)
  jax.block_until_ready(metrics)
  return float(flops), steps / (time.perf_counter() - start)


def sampler_rates(num_tokens: int, batch: int, repeats: int = 3) -> dict[bool, float]:
  """Generated tokens/s of the text Transformer LM, with and without the key/value cache."""
  config = deepflow.load_config(os.path.join(EXPERIMENTS, "text_transformer.py"),
                                ["train.progress=False"])
  with tempfile.TemporaryDirectory() as workdir:
    exp = Experiment(config, workdir)
  variables = {"params": exp.init_state().params}
  prompt = jnp.zeros((batch, 1), jnp.int32)
  draw = jax.jit(decoding.sample, static_argnums=(0, 3),
                 static_argnames=("temperature", "top_k", "use_cache"))
  rates = {}
  for use_cache in (True, False):
    run = lambda: draw(exp.task.model, variables, prompt, num_tokens,  # noqa: E731
                       jax.random.PRNGKey(0), temperature=1.0, use_cache=use_cache)
    run().block_until_ready()
    best = float("inf")
    for _ in range(repeats):
      start = time.perf_counter()
      run().block_until_ready()
      best = min(best, time.perf_counter() - start)
    rates[use_cache] = batch * num_tokens / best
  return rates


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--peak_size", type=int, default=2048)
  parser.add_argument("--sample_tokens", type=int, default=127)
  parser.add_argument("--sample_batch", type=int, default=8)
  args = parser.parse_args()

  print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}")
  peak = matmul_peak(args.peak_size)
  print(f"peak: {args.peak_size}^2 float32 matmul {peak / 1e9:.1f} GFLOP/s")
  for name in ("text_transformer", "digits_vit"):
    flops, rate = train_step_rate(name, args.steps)
    achieved = flops * rate
    print(f"{name} train step: {flops / 1e9:.2f} GFLOP (XLA cost analysis), {rate:.2f} steps/s "
          f"= {achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.1%} of peak")
  rates = sampler_rates(args.sample_tokens, args.sample_batch)
  print(f"sampler (text_transformer, batch {args.sample_batch}, {args.sample_tokens} new tokens): "
        f"{rates[True]:.0f} tokens/s with the KV cache, {rates[False]:.0f} without "
        f"({rates[True] / rates[False]:.1f}x)")


if __name__ == "__main__":
  main()
