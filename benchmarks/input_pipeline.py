"""deepflow's input pipeline on real JPEGs, in one run: loader throughput against PyTorch's
DataLoader, host memory while training, and time to the first step against dataset size.

The dataset is generated here, offline: ``--size`` 64x64x3 JPEG images (quality 90) written as
a TFDS ArrayRecord dataset (``deepflow.data.generated``), read through ``tfds:NAME`` exactly as
a prepared ImageNet is.

1. Images/s delivered with 0, 1 and 2 worker processes by deepflow's train iterator
   (``data.cache=False``: every image is read and decoded each time) and by a PyTorch
   ``DataLoader`` over the same ArrayRecord records, decoding the same bytes with the same
   decoder (``deepflow.data.images.decode``: simplejpeg), batch 128. One contender runs at a
   time, in turn, for ``--rounds`` rounds of ``--batches`` batches, so a noisy neighbour slows
   all alike; the median round counts. Start-up is excluded (3 batches are taken first). With 0
   workers deepflow still reads on its ``data.num_threads`` (2) Grain threads; PyTorch reads in
   the main thread.
2. Peak resident memory (the run and its workers, sampled every 0.2 s, and the run process's
   own high-water mark, which no sampling misses) while `deepflow train` trains a 64-unit MLP
   for ``--steps`` steps with 2 workers, streamed (cache=False) and with the default
   data.cache='auto'; the memory at 10% of the steps against the end shows growth.
   Statistics: seconds to fit ``standardize`` on a 512-image chunk, deepflow's chunked moments
   against numpy's nanmean + nanstd (how it was fitted before).
   Text: tokens/s (padding excluded) delivered by the TextPipeline (SentencePiece BPE of 8,000
   pieces trained on the split, rows of 256 packed tokens, batch 64) from ``--text_docs``
   generated documents (TFDS ArrayRecord) with 0, 1 and 2 workers, timed the same way.
3. Time from starting `deepflow train` to the end of its first step (1-step runs, streaming
   and 'auto') for each of ``--sizes``, after one untimed run that fills the compilation cache
   they share, and the data's share of it measured alone: building the pipeline (cache
   decision, statistics) and taking the first batch, in this process.

    python benchmarks/input_pipeline.py [--size 50000] [--sizes 10000,50000] [--steps 2000]

PyTorch is a benchmark-only dependency (``pip install torch --index-url
https://download.pytorch.org/whl/cpu``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import psutil  # noqa: E402

from deepflow.data import generated, images  # noqa: E402
from dp_step import cpu_name  # noqa: E402  (benchmarks/ is the script's directory)

BATCH = 128
TEXT_BATCH, TEXT_SEQ, TEXT_TOKENIZER = 64, 256, "sentencepiece:bpe:8000"
EXPERIMENT = """
from deepflow.config import base_config

def get_config():
  c = base_config()
  c.model = dict(name="mlp", hidden=(64,))
  c.data.source = "tfds:{name}"
  c.data.batch_size = {batch}
  c.data.eval_batch_size = 500
  c.train.log_every = 10
  c.train.eval_every = 0
  c.train.checkpoint_every = 0
  c.train.progress = False
  return c
"""


def prepare(data_dir: str, size: int) -> str:
  name = f"jpeg64_{size}"
  started = time.perf_counter()
  generated.prepare(name, data_dir, splits={"train": size, "test": 1000}, image_size=(64, 64))
  print(f"# {name}: prepared in {time.perf_counter() - started:.0f} s", flush=True)
  return name


# -- 1. Throughput ---------------------------------------------------------------------------

def deepflow_pipeline(name: str, data_dir: str, *overrides: str):
  from deepflow import config as config_lib
  from deepflow.data.pipeline import Pipeline
  config = config_lib.finalize(config_lib.base_config(), [
      f"data.source=tfds:{name}", f"data.data_dir={data_dir}", f"data.batch_size={BATCH}",
      "train.progress=False", *overrides])
  return Pipeline(config)


def deepflow_batches(name: str, data_dir: str, workers: int):
  return deepflow_pipeline(name, data_dir, "data.transforms=[]", "data.cache=False",
                           f"data.workers={workers}").train_iterator()


def data_first_batch(name: str, data_dir: str, cache: str) -> float:
  """Seconds to build the pipeline (cache decision, statistics of ``standardize``) and take the
  first batch: the data's share of the time to the first step."""
  started = time.perf_counter()
  next(deepflow_pipeline(name, data_dir, f"data.cache={cache}").train_iterator())
  return time.perf_counter() - started


class TorchImages:
  """The same records and decoder as deepflow's loader (its ``DecodedSource``), as a map-style
  torch dataset of (image, label)."""

  def __init__(self, name: str, data_dir: str):
    import tensorflow_datasets as tfds
    self.source = images.DecodedSource(tfds.builder(name, data_dir=data_dir).as_data_source(
        split="train", decoders={"image": tfds.decode.SkipDecoding()}), {"image": None})

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    return self._pair(self.source[index])

  def __getitems__(self, indices):
    """Bulk reads, as deepflow's loader does (DataLoader uses them when a dataset has them)."""
    return [self._pair(e) for e in self.source.__getitems__(indices)]

  @staticmethod
  def _pair(example):
    return example["image"], example["label"]


def torch_batches(name: str, data_dir: str, workers: int):
  import torch
  loader = torch.utils.data.DataLoader(
      TorchImages(name, data_dir), batch_size=BATCH, shuffle=True, drop_last=True,
      num_workers=workers, persistent_workers=workers > 0,
      # JAX is loaded and multithreaded in this process: forking it may deadlock.
      multiprocessing_context="spawn" if workers else None,
      generator=torch.Generator().manual_seed(0))
  while True:
    yield from loader


def throughput(args, name: str, data_dir: str) -> dict[str, float]:
  """Median images/s per contender (``timed``)."""
  makers = {}
  for workers in (0, 1, 2):
    makers[f"deepflow workers={workers}"] = lambda w=workers: deepflow_batches(name, data_dir, w)
    makers[f"torch workers={workers}"] = lambda w=workers: torch_batches(name, data_dir, w)
  return timed(args, makers, lambda batch: BATCH)


def timed(args, makers: dict, count) -> dict[str, float]:
  """Median items/s per contender, ``count(batch)`` items a batch. One contender runs at a time
  (nothing else prefetching in the background), warmed up first: worker start-up is not
  timed."""
  rounds: dict[str, list[float]] = {k: [] for k in makers}
  for _ in range(args.rounds):
    for key, make in makers.items():
      it = make()
      for _ in range(3):
        next(it)
      started, items = time.perf_counter(), 0
      for _ in range(args.batches):
        items += count(next(it))
      rounds[key].append(items / (time.perf_counter() - started))
      getattr(it, "close", lambda: None)()
  return {k: statistics.median(v) for k, v in rounds.items()}


def statistics_speed(repeats: int = 5) -> dict[str, float]:
  """Median seconds to fit ``standardize`` (per channel) on one 512-image chunk of 64x64x3:
  deepflow's chunked moments against numpy's nanmean + nanstd of the chunk."""
  import numpy as np
  from deepflow.data import transforms
  chunk = np.random.default_rng(0).integers(0, 256, (512, 64, 64, 3)).astype(np.float32)
  contenders = {
      "deepflow moments": lambda: transforms.standardize().fit([chunk]),
      "numpy nanmean+nanstd": lambda: (np.nanmean(chunk, (0, 1, 2)), np.nanstd(chunk, (0, 1, 2)))}
  times: dict[str, list[float]] = {k: [] for k in contenders}
  for _ in range(repeats):
    for key, fit in contenders.items():
      started = time.perf_counter()
      fit()
      times[key].append(time.perf_counter() - started)
  return {k: statistics.median(v) for k, v in times.items()}


# -- Text ------------------------------------------------------------------------------------

def text_pipeline(name: str, data_dir: str, workdir: str, workers: int):
  from deepflow import config as config_lib
  from deepflow.data.text import TextPipeline
  config = config_lib.finalize(config_lib.base_config(), [
      "task={'name': 'language_model'}", f"model={{'name': 'transformer_lm', 'max_len': {TEXT_SEQ}}}",
      f"data.source=tfds:{name}", f"data.data_dir={data_dir}", "data.text_feature=text",
      f"data.tokenizer={TEXT_TOKENIZER}", f"data.seq_len={TEXT_SEQ}",
      f"data.batch_size={TEXT_BATCH}", "data.transforms=[]", "train.progress=False",
      f"data.workers={workers}"])
  return TextPipeline(config, workdir)


def text_throughput(args, data_dir: str) -> dict[str, float]:
  """Tokens/s (real tokens, not padding) delivered by the TextPipeline with 0, 1 and 2 workers;
  before that, the start-up one run pays once: training the tokenizer on the train split and
  counting every document's tokens (both then kept in the workdir)."""
  name = f"text_{args.text_docs}"
  started = time.perf_counter()
  generated.prepare(name, data_dir, make=generated.text_builder_class,
                    splits={"train": args.text_docs})
  results = {"prepared_s": time.perf_counter() - started}
  workdir = tempfile.mkdtemp(prefix="deepflow_text_")
  started = time.perf_counter()
  first = text_pipeline(name, data_dir, workdir, 0)
  next(first.train_iterator())
  results["tokenizer_and_count_s"] = time.perf_counter() - started
  results["tokens_per_document"] = float(first.lengths("train").mean() - 1)
  makers = {f"deepflow text workers={w}":
            lambda w=w: text_pipeline(name, data_dir, workdir, w).train_iterator()
            for w in (0, 1, 2)}
  results.update(timed(args, makers, lambda batch: int((batch["segments"] > 0).sum())))
  return results


# -- 2 and 3. Real runs ----------------------------------------------------------------------

def train_run(experiment: str, data_dir: str, workdir: str, steps: int, overrides: list[str]
              ) -> dict[str, float]:
  """Runs `deepflow train`; returns the time to its first logged step, the total time, the peak
  RSS (the run and its workers), and the RSS around 10% of the steps and at the end."""
  command = [sys.executable, "-m", "deepflow", "train", "--config", experiment, "--workdir",
             workdir, f"--config.data.data_dir={data_dir}", f"--config.train.steps={steps}",
             *(f"--config.{o}" for o in overrides)]
  started = time.perf_counter()
  process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
  samples: list[tuple[int, float]] = []   # (logged step, rss)
  metrics = os.path.join(workdir, "metrics.jsonl")

  high_water = 0.0  # the run's own peak (VmHWM): no peak between two samples is missed

  def rss() -> float:
    nonlocal high_water
    try:
      root = psutil.Process(process.pid)
      with open(f"/proc/{process.pid}/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
      high_water = max(high_water, int(kb) * 1024.0)
      return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except (psutil.Error, OSError, StopIteration):
      return 0.0

  def logged() -> int:
    if not os.path.exists(metrics):
      return 0
    lines = [json.loads(x) for x in open(metrics).read().splitlines() if x.strip().endswith("}")]
    return max([r["step"] for r in lines], default=0)

  first_step = None

  def watch():
    nonlocal first_step
    while process.poll() is None:
      step = logged()
      if step and first_step is None:
        first_step = time.perf_counter() - started
      samples.append((step, rss()))
      time.sleep(0.2)
  watcher = threading.Thread(target=watch)
  watcher.start()
  _, stderr = process.communicate()
  watcher.join()
  if process.returncode:
    raise RuntimeError(stderr[-3000:])
  total = time.perf_counter() - started
  early = [r for s, r in samples if 0 < s <= max(steps // 10, 1)] or [samples[0][1]]
  late = [r for s, r in samples if s >= steps * 9 // 10] or [samples[-1][1]]
  return {"first_step_s": first_step or total, "total_s": total,
          "peak_rss_gb": max(r for _, r in samples) / 2**30, "run_peak_gb": high_water / 2**30,
          "rss_at_10pct_gb": max(early) / 2**30, "rss_at_end_gb": max(late) / 2**30}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=50000)
  parser.add_argument("--sizes", default="10000,50000")
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--batches", type=int, default=150)
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--caches", default="False,'auto'", help="data.cache values to run")
  parser.add_argument("--text_docs", type=int, default=20000)
  parser.add_argument("--skip", default="",
                      help="comma-separated: throughput,statistics,text,memory,first")
  args = parser.parse_args()
  skip = set(args.skip.split(","))
  data_dir = args.data_dir or tempfile.mkdtemp(prefix="deepflow_jpeg64_")
  print(f"# {cpu_name()}, {os.cpu_count()} cores; load before: {os.getloadavg()}", flush=True)
  name = prepare(data_dir, args.size)
  results: dict = {"size": args.size}
  if "throughput" not in skip:
    results["images_per_s"] = throughput(args, name, data_dir)
    for workers in (0, 1, 2):
      ours = results["images_per_s"][f"deepflow workers={workers}"]
      theirs = results["images_per_s"][f"torch workers={workers}"]
      print(f"workers={workers}: deepflow {ours:8.0f} img/s  torch {theirs:8.0f} img/s  "
            f"ratio {ours / theirs:.2f}", flush=True)
  if "statistics" not in skip:
    results["statistics_s"] = fit = statistics_speed()
    print(f"standardize on 512 images: deepflow {fit['deepflow moments']:.3f} s, numpy "
          f"{fit['numpy nanmean+nanstd']:.3f} s", flush=True)
  if "text" not in skip:
    results["text"] = text = text_throughput(args, data_dir)
    print(f"text ({args.text_docs} documents, {text['tokens_per_document']:.0f} tokens each, "
          f"{TEXT_TOKENIZER}, rows of {TEXT_SEQ}, batch {TEXT_BATCH}): tokenizer + counting "
          f"{text['tokenizer_and_count_s']:.1f} s; tokens/s with 0 / 1 / 2 workers: " +
          " / ".join(f"{text[f'deepflow text workers={w}']:.0f}" for w in (0, 1, 2)),
          flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    experiment = os.path.join(tmp, "mlp.py")
    if "memory" not in skip:
      for cache in args.caches.split(","):
        with open(experiment, "w") as f:
          f.write(EXPERIMENT.format(name=name, batch=BATCH))
        run = train_run(experiment, data_dir, os.path.join(tmp, f"mem{cache}"), args.steps,
                        [f"data.cache={cache}", "data.workers=2"])
        results[f"memory cache={cache}"] = run
        print(f"train {args.steps} steps, cache={cache}, 2 workers: peak RSS "
              f"{run['peak_rss_gb']:.2f} GB sampled ({run['run_peak_gb']:.2f} GB the run's own "
              f"high-water mark), at 10% {run['rss_at_10pct_gb']:.2f} GB, at end "
              f"{run['rss_at_end_gb']:.2f} GB, {run['total_s']:.0f} s", flush=True)
    if "first" not in skip:
      data_first_batch(name, data_dir, "False")  # untimed: imports, TFDS's first builder
      with open(experiment, "w") as f:  # untimed: fills the compilation cache all runs share
        f.write(EXPERIMENT.format(name=name, batch=BATCH))
      train_run(experiment, data_dir, os.path.join(tmp, "warm"), 1, ["train.log_every=1"])
      for size in map(int, args.sizes.split(",")):
        sized = prepare(data_dir, size) if size != args.size else name
        with open(experiment, "w") as f:
          f.write(EXPERIMENT.format(name=sized, batch=BATCH))
        for cache in args.caches.split(","):
          run = train_run(experiment, data_dir, os.path.join(tmp, f"first{size}{cache}"), 1,
                          [f"data.cache={cache}", "train.log_every=1"])
          data_s = data_first_batch(sized, data_dir, cache)
          results[f"first step size={size} cache={cache}"] = run["first_step_s"]
          results[f"first batch size={size} cache={cache}"] = data_s
          print(f"size {size:7d}, cache={cache}: first step after {run['first_step_s']:.1f} s "
                f"(`deepflow train`), first batch after {data_s:.1f} s (the pipeline alone)",
                flush=True)
  print(f"# load after: {os.getloadavg()}")
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
