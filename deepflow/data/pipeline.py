"""The input pipeline: a Grain dataset of host-local numpy batches, deterministic from the seed.

Batch ``s`` of training is a pure function of (seed, s) (``deepflow.data.sampler``: shuffled
fixed-size batches, or Poisson-sampled ones padded with a ``mask`` under DP-SGD), so the Grain
iterator's state is just its position and a resumed run sees exactly the batches an
uninterrupted one would. On several hosts, every host
computes the same global batch of indices and reads only its own contiguous slice of it; the
global array is the hosts' slices concatenated in process order (``parallel.global_batch``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Protocol

import grain
import jax
import numpy as np
import tqdm
from etils import epath

from deepflow.data import sampler as sampler_lib, sources, transforms as transforms_lib
from deepflow.registry import ConfigError

INPUTS, TARGETS, MASK = "inputs", "targets", "mask"
STATS_FILE = "preprocessing.npz"
PARENT_POLL_S = 0.5  # how often a worker process checks that its parent is alive
STATS_CHUNK = 512  # examples read at a time while fitting statistics
log = logging.getLogger("deepflow")


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What models and tasks may know about the data: shapes after preprocessing, classes, etc."""
  input_shape: tuple[int, ...]
  input_dtype: Any
  target_shape: tuple[int, ...]
  num_classes: int | None
  train_size: int
  metadata: Mapping[str, Any]
  class_counts: tuple[int, ...] | None = None   # train examples per class (class weights)
  # Per batch key (inputs, targets): preprocessed values -> the dataset's units, or None where a
  # transform on them has no inverse (``transforms.inverse``); forecasts report errors in units.
  inverse: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _jax_dtype(array: np.ndarray) -> np.ndarray:
  """64-bit numbers as the 32-bit ones JAX computes with. Done here, on the loader's threads,
  because a 64-bit numpy argument sends every call of the jitted step down its slow path
  (measured: twice the time per step of the digits CNN)."""
  if array.dtype == np.int64:
    return array.astype(np.int32)
  if array.dtype == np.float64:
    return array.astype(np.float32)
  return array


def _grain_flags_parsed() -> None:
  """Grain's worker processes read its absl flags; a program that never parsed flags (a script,
  a notebook, a test) takes their defaults."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
  """Runs in each worker process: it exits within a second of its parent's death (a SIGKILLed
  run, which cannot stop its workers), instead of lingering and holding the run's pipes."""
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(PARENT_POLL_S)
    os._exit(1)
  threading.Thread(target=watch, daemon=True, name="deepflow-parent-watch").start()


def step_batches(batch: Callable[[int], Any], start: int, num_threads: int, workers: int
                 ) -> grain.IterDataset:
  """``batch(start)``, ``batch(start + 1)``, ... computed ahead on ``num_threads`` Grain threads;
  with ``workers`` > 0 in worker processes, each computing every n-th step (Grain's
  ``mp_prefetch``), returned in step order."""
  ds = grain.MapDataset.range(start, sys.maxsize).map(batch)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                            prefetch_buffer_size=max(2, 2 * num_threads)))
  if workers:
    _grain_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=2),
                        worker_init_fn=_exit_with_parent)
  return ds


class DataPipeline(Protocol):
  """What training, evaluation and every command read from an input pipeline; ``Pipeline``
  (stored examples) and ``data.text.TextPipeline`` (a packed text corpus) both give it, and
  ``data.text.make_pipeline`` picks one by the config."""
  spec: DataSpec

  def train_iterator(self, state: Mapping[str, Any] | None = None) -> "TrainIterator":
    """Host-local training batches from the position ``state`` (a checkpoint's) on."""

  def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
    """Every example of ``split`` once, the last batch padded (``MASK`` 0)."""

  def abstract_batch(self, global_size: int, *, train: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes and dtypes of a global batch of ``global_size`` rows (``deepflow plan``)."""


class TrainIterator:
  """Training batches from step ``start`` on. Its state is the next step, so a checkpoint
  resumes with any number of workers (the batches are a function of (seed, step) alone)."""

  def __init__(self, iterator: Iterator[dict[str, np.ndarray]], start: int):
    self._iterator, self.step = iterator, start

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    self.step += 1
    return batch

  def get_state(self) -> dict[str, int]:
    return {"next_index": self.step}

  def close(self) -> None:
    """Stops the worker processes (if any) and frees their shared memory."""
    self._iterator.close()


def per_host(size: int, processes: int, key: str) -> int:
  """One process's share of a global batch of ``size`` rows (``key`` names it in the error)."""
  if size % processes:
    raise ConfigError(f"{key}={size} is not divisible by the {processes} processes")
  return size // processes


def eval_rows(n: int, global_size: int, host_size: int, process_index: int
              ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(rows, valid) of this host's part of each evaluation batch over ``n`` rows in order: the
  last global batch is padded, its padding rows (``valid`` False) pointing at row 0, so every
  row counts once and the eval step compiles once."""
  for start in range(0, -(-n // global_size) * global_size, global_size):
    rows = np.arange(start, start + global_size)[process_index * host_size:
                                                 (process_index + 1) * host_size]
    valid = rows < n
    yield np.where(valid, rows, 0), valid


class Pipeline:
  """Train iterator and eval batches for one config (``config.data`` + ``seed``). ``progress``:
  show bars for the slow one-off passes (caching a split, fitting statistics) on process 0."""

  def __init__(self, config: Any, workdir: str | None = None, *, progress: bool = False):
    data = config.data
    self.seed = config.seed
    self.dataset = sources.open_dataset(data, seed=config.seed)
    self.cache, self.cache_budget_gb = data.cache, data.cache_budget_gb
    self.stats_examples = data.stats_examples
    self.progress = progress and jax.process_index() == 0
    self.train_source = self._split(data.train_split)
    self.eval_sources: dict[str, Any] = {}
    self.num_threads, self.workers = data.num_threads, data.workers
    if self.workers and isinstance(self.train_source, sources.ArraySource):
      # Every worker would hold its own copy of the split (measured: 4.3 GB instead of 1.5 GB
      # for 50,000 64x64 images and 2 workers); batches of an in-memory split are cheap slices.
      log.info("data.workers=%d not used: the train split is held in memory (data.cache)",
               self.workers)
      self.workers = 0
    self.process_count, self.process_index = jax.process_count(), jax.process_index()
    self.sampler = sampler_lib.train_sampler(config, len(self.train_source))
    self.batch_size = per_host(self.sampler.batch_size, self.process_count, "data.batch_size")
    self.eval_batch_size = per_host(data.eval_batch_size, self.process_count,
                                    "data.eval_batch_size")
    self.global_batch_size = self.sampler.batch_size  # rows per step (a Poisson batch's cap)
    self.global_eval_batch_size = data.eval_batch_size
    self.transforms = transforms_lib.build_transforms(data.transforms)
    transforms_lib.check_order(self.transforms, [entry["name"] for entry in data.transforms])
    # Per-example transforms with the feature keys each applies to, resolved once.
    self.per_example = [(t, [transforms_lib.resolve_key(k, self.dataset.input_key,
                                                        self.dataset.target_key) for k in t.keys])
                        for t in self.transforms if t.per_example]
    if (self.num_threads and isinstance(self.train_source, sources.ArraySource)
        and not self.per_example):
      # Such a batch is a gather and whole-batch arithmetic, cheaper than handing it over from a
      # reader thread: the digits CNN's loop ran 1.07x faster without threads (598.6 vs 558.4
      # steps/s). Per-example steps (crops, resizes) keep their threads.
      log.info("data.num_threads=%d not used: the train split is held in memory and has no "
               "per-example steps", self.num_threads)
      self.num_threads = 0
    self.stats = self._fitted_stats(workdir)
    example = self._batch(self.train_source, np.arange(1), train=False, step=0)
    self.spec = DataSpec(
        input_shape=example[INPUTS].shape[1:], input_dtype=example[INPUTS].dtype,
        target_shape=example[TARGETS].shape[1:], num_classes=self.dataset.num_classes,
        train_size=len(self.train_source), metadata=self.dataset.metadata,
        class_counts=self._class_counts(),
        inverse={batch_key: transforms_lib.inverse(self.transforms, self.stats, key,
                                                   self.dataset.input_key, self.dataset.target_key)
                 for batch_key, key in ((INPUTS, self.dataset.input_key),
                                        (TARGETS, self.dataset.target_key))})

  # -- construction helpers ----------------------------------------------------------------------

  def _split(self, name: str):
    """A split, read into host memory when ``data.cache`` says so: True, False, or 'auto' (when
    its estimated decoded size fits ``data.cache_budget_gb``)."""
    source = self.dataset.split(name)
    if len(source) == 0:
      raise ConfigError(f"split {name!r} of {self.dataset.name!r} is empty")
    if isinstance(source, sources.ArraySource):
      return source  # generated in memory
    if not self.cache:
      return source
    nbytes, uniform = sources.decoded_size(source, self.seed)
    if self.cache == "auto":
      cache = uniform and nbytes <= self.cache_budget_gb * 2**30
      why = ("examples of different shapes" if not uniform else
             f"~{nbytes / 2**30:.2f} GB decoded, budget data.cache_budget_gb="
             f"{self.cache_budget_gb:g}")
      log.info("data.cache='auto': %s split %r (%d examples, %s)",
               "caching" if cache else "streaming", name, len(source), why)
    else:
      cache = True
      if not uniform:
        raise ConfigError(f"data.cache=True cannot hold split {name!r} of {self.dataset.name!r} "
                          f"in memory: its examples differ in shape (variable-size images); "
                          f"use data.cache='auto' or False")
    return sources.to_memory(source, progress=self.progress) if cache else source

  def _stats_sample(self) -> np.ndarray:
    """Indices of the train examples statistics are fitted on: all of them when there are at
    most ``data.stats_examples``, else a seeded sample of that many (in order, for locality)."""
    n, limit = len(self.train_source), self.stats_examples
    if n <= limit:
      return np.arange(n)
    return np.sort(np.random.default_rng([self.seed, 4]).choice(n, limit, replace=False))

  def _fitted_stats(self, workdir: str | None):
    """Statistics (and the missing-value check) from a bounded sample of the train split, read
    in chunks (one pass per fitted transform), fitted once per run and kept in the workdir."""
    path = os.path.join(workdir, STATS_FILE) if workdir else None
    if path and epath.Path(path).exists():
      return transforms_lib.load_stats(path)
    indices = self._stats_sample()
    starts = range(0, len(indices), STATS_CHUNK)

    def chunks():  # one pass over the sample (one per fitted transform), a chunk at a time
      for i in tqdm.tqdm(starts, desc="statistics", unit="chunk", dynamic_ncols=True,
                         disable=not self.progress or len(starts) <= 1):
        yield self.examples(self.train_source, indices[i:i + STATS_CHUNK], train=False, step=0)
    stats = transforms_lib.fit_chain(self.transforms, chunks, self.dataset.input_key,
                                     self.dataset.target_key)
    if path and jax.process_index() == 0:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      transforms_lib.save_stats(path, stats)
    return stats

  def _class_counts(self) -> tuple[int, ...] | None:
    """Train examples per class of a classification dataset held in memory (``data.cache``;
    counting a streamed split would read all of it)."""
    n = self.dataset.num_classes
    if not n or not isinstance(self.train_source, sources.ArraySource):
      return None
    labels = self.train_source.arrays[self.dataset.target_key]
    return tuple(int(c) for c in np.bincount(np.asarray(labels).reshape(-1), minlength=n)[:n])

  def examples(self, source, indices: np.ndarray, *, train: bool, step: int
                ) -> dict[str, np.ndarray]:
    """The examples at ``indices``, through the per-example transforms (``data.images``) and
    stacked. Training draws each example's randomness from (seed, step, its index), so it is the
    same whichever host or worker reads it."""
    if not self.per_example:
      return sources.take(source, indices)
    examples = []
    for index, example in zip(indices, sources.read(source, indices)):
      example = dict(example)
      rng = np.random.default_rng([self.seed, step, 3, int(index)]) if train else None
      for t, keys in self.per_example:
        for key in keys:
          example[key] = t.apply({}, example[key], rng)
      examples.append(example)
    return sources.stack(examples)

  def _batch(self, source, indices: np.ndarray, *, train: bool, step: int):
    """The examples at ``indices`` as a preprocessed batch."""
    return self._finish(self.examples(source, indices, train=train, step=step), train=train,
                        step=step)

  def _finish(self, batch: Mapping[str, np.ndarray], *, train: bool, step: int):
    """Preprocesses a fetched batch and renames the supervised keys to inputs/targets."""
    rng = np.random.default_rng([self.seed, step, 0 if train else 1])
    batch = transforms_lib.apply_chain(self.transforms, self.stats, batch,
                                       self.dataset.input_key, self.dataset.target_key,
                                       train=train, rng=rng)
    batch = {k: _jax_dtype(v) for k, v in batch.items()}
    batch[INPUTS] = batch.pop(self.dataset.input_key)
    batch[TARGETS] = batch.pop(self.dataset.target_key)
    return batch

  def abstract_batch(self, global_size: int, *, train: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a global batch of ``global_size`` rows, from one preprocessed
    example (eval batches and Poisson train batches carry ``mask``): what compiling a step
    needs, without the data."""
    example = self._batch(self.train_source, np.arange(1), train=train, step=0)
    if not train or isinstance(self.sampler, sampler_lib.PoissonBatches):  # padded: a mask
      example[MASK] = np.ones(1, np.float32)
    return {k: jax.ShapeDtypeStruct((global_size, *v.shape[1:]), v.dtype)
            for k, v in example.items()}

  def _host_slice(self, indices: np.ndarray, per_host: int) -> np.ndarray:
    return indices[self.process_index * per_host:(self.process_index + 1) * per_host]

  # -- training ----------------------------------------------------------------------------------

  def train_dataset(self, start: int = 0) -> grain.IterDataset:
    """Infinite, reshuffled every epoch; element ``s`` is the host's part of global batch
    ``start + s`` (``step_batches``)."""
    return step_batches(self._train_batch, start, self.num_threads, self.workers)

  def _train_batch(self, step: int):
    indices, mask = self.sampler[step]
    batch = self._batch(self.train_source, self._host_slice(indices, self.batch_size),
                        train=True, step=step)
    if mask is not None:  # Poisson batches: padding rows (mask 0) must contribute nothing
      batch[MASK] = self._host_slice(mask, self.batch_size)
    return batch

  def train_iterator(self, state: Mapping[str, Any] | None = None) -> "TrainIterator":
    """A train iterator, positioned by a saved ``get_state()`` when resuming."""
    start = int(state["next_index"]) if state else 0
    return TrainIterator(iter(self.train_dataset(start)), start)

  # -- evaluation --------------------------------------------------------------------------------

  def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
    """The whole split, in order, in fixed-size batches; the last one padded with ``mask`` = 0
    rows so every example counts exactly once and the eval step compiles once."""
    if split not in self.eval_sources:
      self.eval_sources[split] = self._split(split)
    source = self.eval_sources[split]
    for rows, valid in eval_rows(len(source), self.global_eval_batch_size,
                                 self.eval_batch_size, self.process_index):
      batch = self._batch(source, rows, train=False, step=0)
      batch[MASK] = valid.astype(np.float32)
      yield batch
