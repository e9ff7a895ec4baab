"""Models for small devices, side by side: the digits CNN and the character Transformer as float32
and int8 ONNX artifacts (``deepflow export --format onnx [--quantize int8]``), as float32 and
qwix int8 StableHLO artifacts (``deepflow export [--quantize int8]``) and evaluated by
``deepflow eval --quantize int8``.

For each model: artifact bytes (ONNX and StableHLO, float32 and int8), test-split
accuracy (and perplexity for the language model) of each, ONNX Runtime latency at batch 1 and
64 (float and int8 interleaved, median of many calls, one thread), where the batch-1 time goes
(ONNX Runtime's profiler: each op type's share of the kernel time, and the graph's node count as
a session runs it), and the time to the first prediction in a fresh process: ``deepflow.predict``
on the ONNX artifact (no JAX import) against the StableHLO artifact (JAX), both measured as the
whole subprocess's wall time and as the time inside it.

Run:  python benchmarks/edge.py [--steps_scale 1.0] [--root /tmp/deepflow_edge]
The runs train with the experiments' own settings (digits_cnn.py: 1000 steps; text_transformer.py:
800 steps) once under --root and are reused; --steps_scale shortens them for a quick look.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import deepflow
from deepflow import export, export_onnx, quantize
from deepflow.data import sources
from deepflow.train.experiment import Experiment
from dp_step import cpu_name  # noqa: E402  (benchmarks/ is the script's directory)

MODELS = ("digits_cnn", "text_transformer")
FIRST_PREDICTION = """
import sys, time
t0 = time.perf_counter()
import numpy as np
from deepflow import predict
p = predict.load(sys.argv[1])
p(np.load(sys.argv[2]))
print(time.perf_counter() - t0, "jax" in sys.modules)
"""


def train(name: str, root: str, steps_scale: float) -> str:
  workdir = os.path.join(root, name)
  if not os.path.exists(os.path.join(workdir, "config.json")):
    config = deepflow.load_config(f"experiments/{name}.py", [f"data.data_dir={root}/tfds"])
    with config.unlocked():
      config.train.steps = int(config.train.steps * steps_scale)
      config.train.progress = False
    deepflow.train_and_evaluate(config, workdir)
  return workdir


def test_split(exp: Experiment) -> tuple[np.ndarray, np.ndarray]:
  data = exp.pipeline.dataset
  split = data.split("test")
  raw = sources.take(split, np.arange(len(split)))
  return np.asarray(raw[data.input_key]), np.asarray(raw[data.target_key])


def scores(outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
  """Accuracy; for per-position logits also perplexity (mean next-token NLL, exponentiated)."""
  result = {"accuracy": float((outputs.argmax(-1) == targets).mean())}
  if outputs.ndim == 3:
    shifted = outputs - outputs.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None].astype(np.int64), -1).mean()
    result["perplexity"] = float(np.exp(nll))
  return result


def run_batched(predictor, inputs: np.ndarray, batch: int = 64) -> np.ndarray:
  return np.concatenate([predictor(inputs[i:i + batch]) for i in range(0, len(inputs), batch)])


def session(path: str, **settings):
  """An ONNX Runtime session on one thread (batch-1 latency on a 2-core machine), ``settings``
  set on its options."""
  import onnxruntime
  options = onnxruntime.SessionOptions()
  options.intra_op_num_threads = options.inter_op_num_threads = 1
  options.log_severity_level = 3
  for k, v in settings.items():
    setattr(options, k, v)
  return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def kernel_shares(path: str, x: np.ndarray, calls: int = 200) -> dict:
  """Each op type's share of the kernel time on ``x`` (ONNX Runtime's profiler, each node's
  median call; fused kernels under their own names), largest first, and the nodes the session
  runs."""
  import onnx
  with tempfile.TemporaryDirectory() as tmp:
    sess = session(path, enable_profiling=True, profile_file_prefix=os.path.join(tmp, "p"),
                   optimized_model_filepath=os.path.join(tmp, "optimized.onnx"))
    for _ in range(calls):
      sess.run(None, {sess.get_inputs()[0].name: x})
    with open(sess.end_profiling()) as f:
      events = json.load(f)
    nodes = len(onnx.load(os.path.join(tmp, "optimized.onnx")).graph.node)
  runs = collections.defaultdict(list)  # node -> its kernel's durations, one per call
  for e in events:
    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
      runs[e["name"], e["args"]["op_name"]].append(e["dur"])
  time = collections.Counter()
  for (_, op), durations in runs.items():  # medians: a preempted call would skew a sum
    time[op] += statistics.median(durations)
  total = sum(time.values())
  return {"nodes": nodes, "shares": {k: round(v / total, 3) for k, v in time.most_common(6)}}


def timer(path: str, x: np.ndarray):
  """A function timing one ONNX Runtime call on ``x`` (one thread, warmed up)."""
  sess = session(path)
  feed = {sess.get_inputs()[0].name: x}
  for _ in range(10):
    sess.run(None, feed)

  def one():
    t = time.perf_counter()
    sess.run(None, feed)
    return time.perf_counter() - t
  return one


def latencies(paths: dict[str, str], x: np.ndarray, calls: int = 300) -> dict[str, float]:
  """Median batch-1 latency per artifact, the artifacts' calls interleaved (same load)."""
  timers = {k: timer(p, x) for k, p in paths.items()}
  times = {k: [] for k in paths}
  for _ in range(calls):
    for k, one in timers.items():
      times[k].append(one())
  return {k: statistics.median(v) for k, v in times.items()}


def first_prediction(directory: str, x_path: str) -> tuple[float, float, bool]:
  """(subprocess wall time, time inside it from the first import, whether JAX was imported)."""
  t = time.perf_counter()
  done = subprocess.run([sys.executable, "-c", FIRST_PREDICTION, directory, x_path],
                        capture_output=True, text=True, check=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  wall = time.perf_counter() - t
  inside, jax_loaded = done.stdout.split()
  return wall, float(inside), jax_loaded == "True"


def bench(name: str, root: str, steps_scale: float) -> dict:
  workdir = train(name, root, steps_scale)
  out = {k: os.path.join(root, f"{name}_{k}")
         for k in ("onnx", "int8", "stablehlo", "stablehlo_int8")}
  export_onnx.export_onnx(workdir, out["onnx"])
  export_onnx.export_onnx(workdir, out["int8"], quantize="int8")
  export.export(workdir, out["stablehlo"], platforms=("cpu",))
  export.export(workdir, out["stablehlo_int8"], platforms=("cpu",), quantize="int8")
  from deepflow import predict
  exp, state, step, _ = Experiment.from_workdir(workdir)
  inputs, targets = test_split(exp)
  row = {"model": name, "step": step, "examples": len(inputs)}
  row["bytes"] = {k: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)
                         if f != export.SIGNATURE_FILE) for k, d in out.items()}
  outputs = {k: run_batched(predict.load(d), inputs) for k, d in out.items()}
  row["scores"] = {k: scores(o, targets) for k, o in outputs.items()}
  difference = np.abs(outputs["onnx"] - outputs["stablehlo"])  # the latter: deepflow's forward
  row["onnx_vs_jax"] = {"max_abs": float(difference.max()),
                        "max_output": float(np.abs(outputs["stablehlo"]).max())}
  row["eval"] = {"float": exp.evaluate(state, "test"),
                 "qwix_int8": quantize.evaluate(exp, state, "test")}
  onnx_file = export_onnx.ONNX_FILE
  files = {k: os.path.join(out[k], onnx_file) for k in ("onnx", "int8")}
  row["latency_s"] = latencies(files, inputs[:1])
  row["latency_batch64_s"] = latencies(files, inputs[:64], calls=60)
  row["kernels"] = {k: kernel_shares(p, inputs[:1]) for k, p in files.items()}
  x_path = os.path.join(root, f"{name}_x.npy")
  np.save(x_path, inputs[:1])
  trials = {k: [first_prediction(out[k], x_path) for _ in range(3)]
            for k in ("onnx", "stablehlo")}
  row["first_prediction_s"] = {
      k: {"wall": statistics.median(t[0] for t in v), "inside": statistics.median(
          t[1] for t in v), "imports_jax": v[0][2]} for k, v in trials.items()}
  return row


def summary(row: dict) -> str:
  b, s, lat, first = row["bytes"], row["scores"], row["latency_s"], row["first_prediction_s"]
  lat64, gap = row["latency_batch64_s"], row["onnx_vs_jax"]
  lines = [f"{row['model']} (step {row['step']}, {row['examples']} test examples)",
           f"  bytes: onnx float32 {b['onnx']:,}  int8 {b['int8']:,} "
           f"({b['int8'] / b['onnx']:.3f}x)  stablehlo float32 {b['stablehlo']:,}  int8 "
           f"{b['stablehlo_int8']:,} ({b['stablehlo_int8'] / b['stablehlo']:.3f}x)",
           f"  onnx float32 {s['onnx']}  int8 {s['int8']}  stablehlo float32 {s['stablehlo']}"
           f"  int8 (qwix) {s['stablehlo_int8']}",
           f"  onnx float32 vs deepflow's forward, whole test split: max |difference| "
           f"{gap['max_abs']:.1e} (largest output {gap['max_output']:.1f})",
           f"  deepflow eval: float {_short(row['eval']['float'])}  "
           f"qwix int8 {_short(row['eval']['qwix_int8'])}",
           f"  onnxruntime batch-1 latency (1 thread, median): float32 {lat['onnx'] * 1e3:.3f} ms"
           f"  int8 {lat['int8'] * 1e3:.3f} ms ({lat['int8'] / lat['onnx']:.2f}x); batch 64: "
           f"{lat64['onnx'] * 1e3:.2f} ms, {lat64['int8'] * 1e3:.2f} ms "
           f"({lat64['int8'] / lat64['onnx']:.2f}x)",
           *(f"  {k} batch 1: {v['nodes']} nodes run; kernel time " + ", ".join(
               f"{op} {share:.0%}" for op, share in v["shares"].items())
             for k, v in row["kernels"].items()),
           "  first prediction in a fresh process (wall / from first import): " + "  ".join(
               f"{k} {v['wall']:.2f} s / {v['inside']:.2f} s (jax imported: {v['imports_jax']})"
               for k, v in first.items())]
  return "\n".join(lines)


def _short(metrics: dict) -> str:
  return " ".join(f"{k}={metrics[k]:.4f}" for k in ("accuracy", "perplexity") if k in metrics)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", default="/tmp/deepflow_edge")
  parser.add_argument("--steps_scale", type=float, default=1.0)
  parser.add_argument("--models", default=",".join(MODELS))
  args = parser.parse_args()
  print(f"machine: {cpu_name()}, {os.cpu_count()} cores; load before {os.getloadavg()}")
  rows = [bench(name, args.root, args.steps_scale) for name in args.models.split(",")]
  for row in rows:
    print(summary(row))
  print(f"load after {os.getloadavg()}")
  print(json.dumps(rows))


if __name__ == "__main__":
  main()
