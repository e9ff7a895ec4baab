"""``deepflow plan --remat_policies``: one experiment for every remat policy (only the task is
rebuilt per policy) against a whole ``Experiment`` per policy, as the table was built before,
timed side by side in one process, interleaved (A B A B) so the machine's load falls on both.

Each arm builds the plan's experiment and compiles the train step under each of
``plan.REMAT_COMPARED`` (4 policies), a small ViT on ``bundled:digits`` (its data prepared into
a temporary directory before timing), one CPU device, XLA's default optimizations, no persistent
compilation cache. The figures of both arms are checked equal.

    python benchmarks/plan_remat.py

Measured (x86_64, 2 CPU cores shared with other agents' jobs, load average 6.6-8.3, jax 0.10.2),
two runs: best of 2 per policy 52.44 s, once 48.13 s (ratio 0.92); per policy 49.54 s, once
38.84 s (0.78). One experiment builds in 0.34 s once its data is prepared, so building 4 fewer
saves about 1.4 s: the rest of those ratios is the load's noise on the 4 compiles per arm
(about 10 s each at that load), which dominate. The saving grows with what an experiment
costs to build (a larger dataset's statistics, a tokenizer), not with the model.
"""
from __future__ import annotations

import copy
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)

import jax  # noqa: E402

from deepflow import config as config_lib, plan as plan_lib  # noqa: E402
from deepflow.train.experiment import Experiment  # noqa: E402

ROUNDS = 2


def small_config(data_dir: str):
  c = config_lib.base_config()
  c.model = dict(name="vit", patch_size=2, d_model=32, num_heads=4, num_layers=2, mlp_dim=64,
                 scan_layers=True, remat_policy="dots_saveable")
  c.data.source = "bundled:digits"
  c.data.data_dir = data_dir
  c.data.batch_size = 64
  c.train.compilation_cache = ""
  return config_lib.finalize(c, num_devices=1)


def per_policy(config, devices) -> list[tuple[int, int]]:
  """The table as built before: the plan's experiment, then a whole experiment per policy."""
  Experiment(config, None, devices=devices)
  figures = []
  for policy in plan_lib.REMAT_COMPARED:
    variant = copy.deepcopy(config)
    variant.model.remat_policy = policy
    exp = Experiment(variant, None, devices=devices)
    cost = plan_lib.compile_cost(exp.train_step, plan_lib.abstract_args(exp),
                                 exp.pipeline.abstract_batch(config.data.batch_size, train=True))
    figures.append((cost.temporaries, cost.peak))
  return figures


def once(config, devices) -> list[tuple[int, int]]:
  """The table as ``plan`` builds it now: the plan's experiment serves every policy."""
  rows = plan_lib.remat_table(Experiment(config, None, devices=devices))
  return [(r["temporaries"], r["peak"]) for r in rows]


def main() -> None:
  devices = jax.devices()[:1]
  with tempfile.TemporaryDirectory() as data_dir:
    config = small_config(data_dir)
    start = time.perf_counter()
    Experiment(config, None, devices=devices)  # prepares the data; later builds only read it
    print(f"first experiment (prepares bundled:digits): {time.perf_counter() - start:.2f} s")
    start = time.perf_counter()
    Experiment(config, None, devices=devices)
    print(f"one experiment, data prepared: {time.perf_counter() - start:.2f} s")
    times: dict[str, list[float]] = {"per_policy": [], "once": []}
    results = {}
    for _ in range(ROUNDS):
      for name, arm in (("per_policy", per_policy), ("once", once)):
        start = time.perf_counter()
        results[name] = arm(config, devices)
        times[name].append(time.perf_counter() - start)
        print(f"{name:<10} {times[name][-1]:7.2f} s  (load {os.getloadavg()[0]:.1f})")
    assert results["per_policy"] == results["once"], results
    best = {name: min(t) for name, t in times.items()}
    print(f"best of {ROUNDS}: per policy {best['per_policy']:.2f} s, once {best['once']:.2f} s, "
          f"once / per policy = {best['once'] / best['per_policy']:.2f}; figures identical")


if __name__ == "__main__":
  main()
