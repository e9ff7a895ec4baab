"""Compile time and the plan's predictions, each measured side by side with its baseline in one
run (one JAX CPU device, XLA's default optimizations):

1. compile time of the ``transformer_lm`` train step (``Experiment``'s jitted step, lowered and
   compiled from abstract shapes) at depth 4 and 32, with and without ``model.scan_layers``;
2. time to the first train step of experiments/digits_cnn.py and text_transformer.py (a fresh
   ``deepflow train --config.train.steps=1`` process each, until its first step's metrics are
   on disk; also the whole run's wall and CPU time), with a cold persistent compilation cache
   (an empty directory) and then warm (the same directory again);
3. ``deepflow plan --measure 5`` on the CPU: the predicted peak memory of the train step against
   what 5 real steps add to the process's resident memory, for an MLP with 100 MB of state.

    python benchmarks/plan_and_compile.py [compile] [cache] [measure]   # default: all three

Compile times, measured in one run, interleaved (x86_64, 2 CPU cores shared with other jobs,
jax 0.10.2, XLA's default optimizations; the load average when each finished in brackets):
scanned depth 4 8.88 s (1.9), scanned depth 32 7.91 s (2.1), unscanned depth 4 10.04 s (2.1),
unscanned depth 32 229.09 s (5.9), scanned depth 4 again 7.33 s (5.5), scanned depth 32 again
6.99 s (5.2): scanned depth 32 / depth 4 = 0.95 (best of each; target <= 1.5), unscanned 22.8.
A run under a load of 12-14 gave scanned 0.72 and 1.25 in its two rounds, and its unscanned
depth-32 compile did not finish within the 600 s cap.
Time to first step, one run at load 5-7: digits_cnn cold cache 12.6 s, warm 4.6 s (37%);
text_transformer cold 21.3 s, warm 8.1 s (38%). CPU time of the whole run (less sensitive to
the load): digits_cnn 10.6 s vs 4.0 s (37%), text_transformer 17.1 s vs 6.7 s (39%). Before
the warm start was trimmed (tensorboardX imported PyTorch, the bundled builders pandas), on the
idle machine (load 0.2-0.9), whole run: digits_cnn cold 8.8 s, warm 5.4 s (61%);
text_transformer cold 12.7 s, warm 8.0 s (63%). plan --measure: predicted 398.2 MiB, measured
425.9 MiB (+7.0%).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
       "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
ENV.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
# An unscanned depth-32 compile is stopped after this long and reported as such.
UNSCANNED_CAP = 600.0


def compile_seconds(depth: int, scan: bool, timeout: float | None = None) -> float | None:
  """Seconds to lower and compile the train step in a fresh process; None past ``timeout``."""
  code = f"""
import time, jax, deepflow
from deepflow.plan import compile_cost
from deepflow.train.experiment import Experiment
config = deepflow.load_config({os.path.join(ROOT, 'experiments', 'text_transformer.py')!r}, [
    "model.num_layers={depth}", "model.scan_layers={scan}", "train.compilation_cache="])
exp = Experiment(config, None)
args = jax.tree.map(lambda l, s: jax.ShapeDtypeStruct(l.shape, l.dtype, sharding=s),
                    exp.abstract_state, exp.shardings)
start = time.perf_counter()
compile_cost(exp.train_step, args, exp.pipeline.abstract_batch(config.data.batch_size, train=True))
print(time.perf_counter() - start)
"""
  try:
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True,
                         check=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return None
  return float(out.stdout.split()[-1])


def compare_compile_times(unscanned_cap: float) -> None:
  """Depth 4 vs 32, scanned and unscanned, interleaved so that the machine's load falls on both
  sides alike; the scanned pair is measured twice (before and after the unscanned one). An
  unscanned depth-32 compile longer than ``unscanned_cap`` seconds is stopped and reported."""
  times: dict[tuple[int, bool], list[float]] = {}
  for depth, scan in ((4, True), (32, True), (4, False), (32, False), (4, True), (32, True)):
    seconds = compile_seconds(depth, scan, timeout=unscanned_cap if not scan else None)
    load = os.getloadavg()[0]
    name = f"depth {depth:2d} {'scanned' if scan else 'unscanned'}"
    if seconds is None:
      print(f"compile transformer_lm {name}: did not finish in {unscanned_cap:.0f} s "
            f"(load {load:.1f})", flush=True)
      continue
    times.setdefault((depth, scan), []).append(seconds)
    print(f"compile transformer_lm {name}: {seconds:.2f} s (load {load:.1f})", flush=True)
  for scan in (True, False):
    four, deep = times.get((4, scan)), times.get((32, scan))
    if four and deep:
      print(f"{'scanned' if scan else 'unscanned'}: depth 32 / depth 4 = "
            f"{min(deep) / min(four):.2f} (best of each)")


def first_step_seconds(experiment: str, cache: str, workdir: str) -> tuple[float, float, float]:
  """One ``deepflow train --config.train.steps=1`` in a fresh process: seconds from its start to
  its first step's metrics on disk (polled every 10 ms), seconds of the whole run (which also
  saves a checkpoint, evaluates on the test split and exits), and the CPU seconds (user + system)
  the run used, which the machine's load affects less than wall time."""
  metrics = os.path.join(workdir, "metrics.jsonl")
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  with tempfile.TemporaryFile() as stderr:
    process = subprocess.Popen(
        [sys.executable, "-m", "deepflow", "train", "--config",
         os.path.join(ROOT, "experiments", experiment), "--workdir", workdir,
         "--config.train.steps=1", "--config.train.eval_every=0",
         "--config.train.progress=False", f"--config.train.compilation_cache={cache}"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=stderr)
    first = None
    while process.poll() is None:
      if first is None and os.path.exists(metrics) and '"train"' in open(metrics).read():
        first = time.perf_counter() - start
      time.sleep(0.01)
    whole = time.perf_counter() - start
    if process.returncode:
      stderr.seek(0)
      raise RuntimeError(stderr.read().decode()[-4000:])
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return first if first is not None else whole, whole, cpu


MLP = """
from deepflow.config import base_config

def get_config():
  c = base_config()
  c.model = dict(name="mlp", hidden=(4096, 4096))
  c.data.source = "synthetic:digits_like"
  c.data.batch_size = 256
  c.data.transforms = []
  c.train.compilation_cache = ""
  return c
"""


def compare_cache(tmp: str) -> None:
  for experiment in ("digits_cnn.py", "text_transformer.py"):
    cache = os.path.join(tmp, f"cache-{experiment}")
    runs = {name: first_step_seconds(experiment, cache, os.path.join(tmp, f"{name}-{experiment}"))
            for name in ("cold", "warm")}
    (cold_first, cold_whole, cold_cpu), (warm_first, warm_whole, warm_cpu) = runs.values()
    print(f"{experiment}: time to first step: cold cache {cold_first:.1f} s, warm "
          f"{warm_first:.1f} s ({warm_first / cold_first:.0%}); whole run: cold {cold_whole:.1f} "
          f"s, warm {warm_whole:.1f} s ({warm_whole / cold_whole:.0%}); CPU time of the whole "
          f"run: cold {cold_cpu:.1f} s, warm {warm_cpu:.1f} s ({warm_cpu / cold_cpu:.0%}) "
          f"(load {os.getloadavg()[0]:.1f})", flush=True)


def compare_measured(tmp: str) -> None:
  path = os.path.join(tmp, "mlp.py")
  with open(path, "w") as f:
    f.write(MLP)
  out = subprocess.run([sys.executable, "-m", "deepflow", "plan", "--config", path,
                        "--measure", "5", "--json"], env=ENV, capture_output=True, text=True,
                       check=True)
  plan = json.loads(out.stdout)
  predicted, measured = plan["train_step"]["peak"], plan["measured"]["peak_bytes"]
  print(f"plan --measure 5 (MLP 64-4096-4096-10, batch 256): predicted peak "
        f"{predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB "
        f"({measured / predicted - 1:+.1%})")


def main() -> None:
  """``python benchmarks/plan_and_compile.py [compile] [cache] [measure]`` (default: all)."""
  parts = sys.argv[1:] or ["compile", "cache", "measure"]
  print(f"load average before: {os.getloadavg()}")
  if "compile" in parts:
    compare_compile_times(unscanned_cap=UNSCANNED_CAP)
  with tempfile.TemporaryDirectory() as tmp:
    if "cache" in parts:
      compare_cache(tmp)
    if "measure" in parts:
      compare_measured(tmp)
  print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
  main()
