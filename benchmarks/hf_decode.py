"""Greedy decoding of a GPT-2-small-shaped model (124 M parameters, random weights, float32):
deepflow's sampler (``decoding.sample``, jitted: prefill then a scan with the key/value cache)
on the checkpoint ``transformers`` saved vs ``transformers``' own ``generate`` (its cache on),
side by side in one process, the same weights and dtype.

    python benchmarks/hf_decode.py [--batches 1 8] [--prompt 32] [--new 128] [--repeats 3]

Prints new tokens per second (batch x new tokens / seconds, median of the repeats; deepflow's
compilation is timed apart) and the ratio; both use the machine's cores (torch threads = cores).
Needs torch and transformers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

import deepflow
from deepflow.models import decoding

SAMPLE = jax.jit(decoding.sample, static_argnums=(0, 3), static_argnames=("temperature",))


def timed(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--prompt", type=int, default=32)
  parser.add_argument("--new", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  transformers.logging.set_verbosity_error()
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  reference = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
  reference.generation_config.eos_token_id = None
  reference.generation_config.pad_token_id = 0
  with tempfile.TemporaryDirectory() as directory:
    reference.save_pretrained(directory)
    model, variables = deepflow.load_pretrained(directory)
  key = jax.random.PRNGKey(0)
  print("| batch | transformers generate (tokens/s) | deepflow sample (tokens/s) | ratio | "
        "deepflow compile (s) | same tokens |")
  print("|---|---|---|---|---|---|")
  for batch in args.batches:
    prompt = np.random.default_rng(batch).integers(0, 50257, (batch, args.prompt)).astype(
        np.int32)
    ids, mask = torch.from_numpy(prompt).long(), torch.ones(prompt.shape, dtype=torch.long)

    def theirs():
      with torch.no_grad():
        return reference.generate(ids, attention_mask=mask, max_new_tokens=args.new,
                                  min_new_tokens=args.new, do_sample=False).numpy()

    def ours():
      return np.asarray(SAMPLE(model, variables, prompt, args.new, key, temperature=0.0))

    start = time.perf_counter()
    first = ours()
    compile_s = time.perf_counter() - start
    same = bool((first == theirs()).all())
    t_theirs, t_ours = timed(theirs, args.repeats), timed(ours, args.repeats)
    rate = lambda t: batch * args.new / t  # noqa: E731
    print(f"| {batch} | {rate(t_theirs):.0f} | {rate(t_ours):.0f} | {t_theirs / t_ours:.2f}x | "
          f"{compile_s:.1f} | {'yes' if same else 'no'} |", flush=True)
  print(f"GPT-2 small (124 M), float32, prompt {args.prompt}, {args.new} new tokens, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
