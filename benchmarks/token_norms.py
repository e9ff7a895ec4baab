"""Ghost clipping's per-example norms of an embedding table (token or learned-position ids),
its two forms side by side: the T x T Gram (``sum_{t,s} [ids_t == ids_s] <g_t, g_s>``) and the
runs of equal ids after a sort (``deepflow.privacy.token_norms``). Each shape times both forms,
jitted, in interleaved rounds (median), on random ids and output gradients; the default form
switches at ``RUNS_MIN_SIZE`` values of T x C an example.

    python benchmarks/token_norms.py [--shapes N:T:C:V,...] [--rounds 5]
"""
from __future__ import annotations

import argparse
import functools
import os

import jax
import numpy as np

from deepflow.privacy import token_norms
from dp_step import machine  # noqa: E402  (benchmarks/ is the script's directory)
from resident import time_round  # noqa: E402

SHAPES = "64:16:32:20,64:96:64:1000,64:128:64:1000,16:128:768:50000,8:256:128:256,8:1024:768:50000"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default=SHAPES, help="N:T:C:V (batch, ids an example, "
                      "features, vocabulary), comma-separated")
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f}; default form from "
        f"T x C >= {token_norms.RUNS_MIN_SIZE}")
  rng = np.random.default_rng(0)
  for shape in args.shapes.split(","):
    n, t, c, v = map(int, shape.split(":"))
    ids = rng.integers(0, v, (n, t))
    g = rng.standard_normal((n, t, c), dtype=np.float32)
    forms = {form: jax.jit(functools.partial(token_norms.sq_norms, form=form))
             for form in ("gram", "runs")}
    calls = {form: functools.partial(fn, ids, g) for form, fn in forms.items()}
    for call in calls.values():  # compile
      jax.block_until_ready(call())
    times = {form: [] for form in forms}
    for _ in range(args.rounds):
      for form, call in calls.items():
        times[form].append(time_round(call, jax.block_until_ready, 5))
    gram, runs = (float(np.median(times[f])) for f in ("gram", "runs"))
    default = token_norms.cpu_form(g) if jax.default_backend() == "cpu" else "gram"
    print(f"N={n} T={t} C={c} V={v}: gram {gram * 1e3:.3f} ms, runs {runs * 1e3:.3f} ms, "
          f"runs {gram / runs:.2f}x faster; default {default}")


if __name__ == "__main__":
  main()
