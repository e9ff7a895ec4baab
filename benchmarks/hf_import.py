"""Importing a ~1 B-parameter Llama-shaped bfloat16 checkpoint (Llama-3.2-1B's shapes, random
weights, ~2.5 GB of safetensors in shards with an index): ``deepflow.load_pretrained`` (weights
kept in bfloat16, placed on the first device) vs reading the same files with ``safetensors``
alone (``safe_open(..., 'pt')``, every tensor read once), each in a fresh process, after one
pass that puts the files in the page cache.

    python benchmarks/hf_import.py [--dir /tmp/llama1b] [--layers 16]

Prints wall time and peak resident memory (VmHWM) of each process, and its peak after its
imports (the interpreter, torch or JAX), so the load's own share is the difference. The checkpoint is written once into --dir (kept for reruns).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np

SHAPES = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
              num_attention_heads=32, num_key_value_heads=8, head_dim=64)
SHARD_BYTES = 500 * 2 ** 20

READ_SAFETENSORS = """
import json, os, sys, time
from safetensors import safe_open
HWM = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])
base = HWM()
start = time.perf_counter()
files = sorted(set(json.load(open(os.path.join(sys.argv[1], 'model.safetensors.index.json')))
                   ['weight_map'].values()))
for name in files:
  with safe_open(os.path.join(sys.argv[1], name), 'pt') as f:
    for key in f.keys():
      f.get_tensor(key)
print(json.dumps({'seconds': time.perf_counter() - start, 'base_mb': base / 1024,
                  'peak_mb': HWM() / 1024}))
"""

LOAD_DEEPFLOW = """
import json, sys, time
import jax, deepflow
HWM = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])
base = HWM()
start = time.perf_counter()
model, variables = deepflow.load_pretrained(sys.argv[1])
jax.block_until_ready(variables)
print(json.dumps({'seconds': time.perf_counter() - start, 'base_mb': base / 1024,
                  'peak_mb': HWM() / 1024,
                  'dtype': str(jax.tree.leaves(variables)[0].dtype)}))
"""


def write_checkpoint(directory: str, layers: int) -> int:
  """A Llama-3.2-1B-shaped bfloat16 checkpoint of random weights; returns its bytes."""
  from deepflow.hf import files
  from deepflow.hf.llama import weight_rules
  config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **SHAPES,
            "num_hidden_layers": layers, "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "dtype": "bfloat16",
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}}
  d, kv = SHAPES["hidden_size"], SHAPES["num_key_value_heads"] * SHAPES["head_dim"]
  shapes = {"embed_tokens": (SHAPES["vocab_size"], d), "q_proj": (d, d), "k_proj": (kv, d),
            "v_proj": (kv, d), "o_proj": (d, d), "gate_proj": (SHAPES["intermediate_size"], d),
            "up_proj": (SHAPES["intermediate_size"], d),
            "down_proj": (d, SHAPES["intermediate_size"])}
  rng = np.random.default_rng(0)
  names = [r.hf_name for r in weight_rules(config)]
  shape_of = lambda n: next((s for k, s in shapes.items() if f".{k}." in n), (d,))  # noqa: E731
  sizes = [(n, int(np.prod(shape_of(n))) * 2) for n in names]
  groups = list(files.shards(sizes, SHARD_BYTES))
  os.makedirs(directory, exist_ok=True)
  weight_map = {}
  for k, group in enumerate(groups):
    shard = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
    files.write_safetensors(os.path.join(directory, shard), {
        n: (rng.standard_normal(shape_of(n), np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        for n in group})
    weight_map.update({n: shard for n in group})
  total = sum(s for _, s in sizes)
  with open(os.path.join(directory, files.INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  with open(os.path.join(directory, files.CONFIG), "w") as f:
    json.dump(config, f)
  return total


def run(script: str, directory: str) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", script, directory], capture_output=True,
                       text=True, env=env, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", default="/tmp/llama1b_bf16")
  parser.add_argument("--layers", type=int, default=16)
  args = parser.parse_args(argv)
  from deepflow.hf import files
  if not os.path.isfile(os.path.join(args.dir, files.CONFIG)):
    write_checkpoint(args.dir, args.layers)
  paths = [os.path.join(args.dir, f) for f in os.listdir(args.dir)]
  total = sum(os.path.getsize(p) for p in paths)
  for path in paths:  # into the page cache, for both readers alike
    with open(path, "rb") as f:
      while f.read(64 * 2 ** 20):
        pass
  alone, ours = run(READ_SAFETENSORS, args.dir), run(LOAD_DEEPFLOW, args.dir)
  print("| reader | seconds | peak RSS (MB) | RSS after imports (MB) | peak - imports (MB) |")
  print("|---|---|---|---|---|")
  for name, r in (("safetensors alone (torch)", alone), ("deepflow.load_pretrained", ours)):
    print(f"| {name} | {r['seconds']:.1f} | {r['peak_mb']:.0f} | {r['base_mb']:.0f} | "
          f"{r['peak_mb'] - r['base_mb']:.0f} |")
  print(f"checkpoint {total / 2 ** 20:.0f} MB ({len(paths) - 2} shards), loaded as "
        f"{ours['dtype']}; time ratio {ours['seconds'] / alone['seconds']:.2f}; "
        f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores")


if __name__ == "__main__":
  main()
