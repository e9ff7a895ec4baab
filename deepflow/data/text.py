"""Text corpora at scale: a TFDS text feature (``tfds:NAME``, or ``bundled:text/documents``),
tokenized (``data.tokenizer``) and packed into rows of ``data.seq_len`` tokens with document
boundaries kept (``deepflow.data.packing``).

Nothing is held in memory but one int per document. Before the first step the tokenizer is
built (or read back from the workdir) and one streaming pass over the train split counts each
document's tokens (kept in the workdir as ``text_lengths_SPLIT.npy``); from then on training
batch ``s`` is a pure function of (seed, s): its rows are those of the epoch's document
permutation, read and tokenized on Grain's threads, so a resumed run (the iterator's state is its
position, saved in checkpoints) sees exactly the batches an uninterrupted one would. Evaluation
packs a split in its stored order; padding rows and positions count for nothing.

``TextPipeline`` offers what ``Pipeline`` offers the loop, the tasks and ``plan``; its
``DataSpec`` comes from the config alone (shapes, the tokenizer's vocabulary size), so planning
reads no text.
"""
from __future__ import annotations

import functools
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
import tqdm
from etils import epath

from deepflow.atomic import atomic_path
from deepflow.data import packing, sources, tokenizers
from deepflow.data.pipeline import (MASK, DataPipeline, DataSpec, Pipeline, TrainIterator,
                                    eval_rows, per_host, step_batches)
from deepflow.registry import ConfigError

READ_CHUNK = 1024   # documents read and tokenized together in the counting pass


def text_feature(features: Mapping[str, Any], name: str, spec: str) -> str:
  """The feature holding the text: ``name``, or (``''``) the dataset's only Text feature."""
  import tensorflow_datasets as tfds
  texts = [k for k, f in features.items() if isinstance(f, tfds.features.Text)]
  hint = "" if texts else ("; it has no Text feature for data.tokenizer to read (the bundled "
                           "help topics as text: data.source='bundled:text/documents')")
  if name:
    if name not in features:
      raise ConfigError(f"dataset {spec!r} has no feature {name!r} (data.text_feature); "
                        f"features: {', '.join(sorted(features))}{hint}")
    return name
  if not texts:
    raise ConfigError(f"dataset {spec!r} cannot be tokenized{hint}")
  if len(texts) != 1:
    raise ConfigError(f"dataset {spec!r} needs data.text_feature to say which feature holds the "
                      f"text (Text features: {', '.join(texts)})")
  return texts[0]


class TextPipeline:
  """Train iterator and eval batches of packed token rows for one config."""

  def __init__(self, config: Any, workdir: str | None = None, *, progress: bool = False):
    data = config.data
    kind, _ = sources.parse_source(data.source)
    if kind == "synthetic":
      raise ConfigError(f"data.tokenizer={data.tokenizer!r} reads a TFDS or bundled text dataset "
                        f"(data.source='tfds:NAME' or 'bundled:text/documents'), got "
                        f"{data.source!r}")
    self.config, self.workdir, self.seed = config, workdir, config.seed
    self.progress = progress and jax.process_index() == 0
    self.builder, self.splits = sources.open_splits(data.source, data.data_dir or
                                                    sources.default_data_dir())
    self.feature = text_feature(self.builder.info.features, data.text_feature, data.source)
    self.seq_len, self.num_threads, self.workers = data.seq_len, data.num_threads, data.workers
    self.process_count, self.process_index = jax.process_count(), jax.process_index()
    self.global_batch_size, self.global_eval_batch_size = data.batch_size, data.eval_batch_size
    self.batch_size = per_host(data.batch_size, self.process_count, "data.batch_size")
    self.eval_batch_size = per_host(data.eval_batch_size, self.process_count,
                                    "data.eval_batch_size")
    self.train_split = data.train_split
    self._lengths: dict[str, np.ndarray] = {}
    self._streams: dict[tuple[str, bool], packing.PackedStream] = {}
    vocab_size = tokenizers.vocab_size(data.tokenizer, workdir)  # the workdir's copy wins
    tokenizers.check_fits(data.tokenizer, vocab_size, config.model.get("vocab_size", 0))
    self.spec = DataSpec(
        input_shape=(self.seq_len,), input_dtype=np.dtype(np.int32),
        target_shape=(self.seq_len,), num_classes=None,
        train_size=len(self._source(data.train_split)),  # documents
        metadata={"vocab_size": vocab_size,
                  "load_tokenizer": lambda: self.tokenizer, "text_feature": self.feature})

  def _source(self, split: str) -> Sequence:
    if split not in self.splits:
      raise ConfigError(f"dataset {self.config.data.source!r} has no split {split!r}; splits: "
                        f"{', '.join(sorted(self.splits))}")
    return self.splits[split]

  def _texts(self, split: str, documents: Sequence[int]) -> list[str]:
    source = self._source(split)
    examples = sources.read(source, np.asarray(documents))
    return [tokenizers.as_text(e[self.feature]) for e in examples]

  # -- tokenizer and document lengths (built once per run, kept in the workdir) ------------------

  @functools.cached_property
  def tokenizer(self) -> tokenizers.Tokenizer:
    return tokenizers.load_or_build(self.config.data.tokenizer, self.workdir, self._sample)

  def _sample(self, count: int) -> list[str]:
    """Up to ``count`` train documents, a seeded sample, in stored order (tokenizer training)."""
    n = len(self._source(self.train_split))
    chosen = np.sort(np.random.default_rng([self.seed, 4]).permutation(n)[:count])
    return [t for i in range(0, len(chosen), READ_CHUNK)
            for t in self._texts(self.train_split, chosen[i:i + READ_CHUNK])]

  def encode(self, split: str, documents: Sequence[int]) -> dict[int, tuple[np.ndarray,
                                                                            np.ndarray]]:
    """Each document's (inputs, targets) pairs (``packing.document_pairs``)."""
    tok = self.tokenizer
    ids = tok.encode(self._texts(split, documents))
    return {d: packing.document_pairs(t, tok.bos, tok.eos) for d, t in zip(documents, ids)}

  def lengths(self, split: str) -> np.ndarray:
    """Pairs per document of ``split`` (tokens + 1): one streaming pass, then read back."""
    if split not in self._lengths:
      self._lengths[split] = self._count(split)
    return self._lengths[split]

  def _count(self, split: str) -> np.ndarray:
    path = epath.Path(self.workdir) / f"text_lengths_{split}.npy" if self.workdir else None
    if path is not None and path.exists():
      return np.load(path)
    n = len(self._source(split))
    out = np.empty(n, np.int32)
    bar = tqdm.tqdm(total=n, unit="doc", desc=f"counting tokens of {split}",
                    disable=not self.progress)
    with bar:
      for start in range(0, n, READ_CHUNK):
        docs = range(start, min(start + READ_CHUNK, n))
        ids = self.tokenizer.encode(self._texts(split, docs))
        out[start:start + len(ids)] = [len(t) + 1 for t in ids]
        bar.update(len(ids))
    if path is not None and self.process_index == 0:
      with atomic_path(path) as tmp:
        np.save(tmp, out)
    return out

  def stream(self, split: str, *, train: bool) -> packing.PackedStream:
    if (split, train) not in self._streams:
      self._streams[split, train] = self._new_stream(split, train)
    return self._streams[split, train]

  def _new_stream(self, split: str, train: bool) -> packing.PackedStream:
    lengths = self.lengths(split)
    order = None
    if train:
      def order(epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 3]).permutation(len(lengths))
    try:
      return packing.PackedStream(lengths, self.seq_len, order, drop_remainder=train)
    except ValueError as e:
      raise ConfigError(f"split {split!r} of {self.config.data.source!r}: {e}") from e

  # -- batches -----------------------------------------------------------------------------------

  def _rows(self, split: str, rows: np.ndarray, *, train: bool) -> dict[str, np.ndarray]:
    stream = self.stream(split, train=train)
    return packing.pack_rows(stream, rows, functools.partial(self.encode, split))

  def _train_batch(self, step: int) -> dict[str, np.ndarray]:
    first = step * self.global_batch_size + self.process_index * self.batch_size
    return self._rows(self.train_split, np.arange(first, first + self.batch_size), train=True)

  def train_iterator(self, state: Mapping[str, Any] | None = None) -> TrainIterator:
    """Batch ``s`` of training (this host's rows), positioned by a saved state when resuming;
    computed in ``data.workers`` processes when > 0, with the same batches."""
    self.stream(self.train_split, train=True)  # count before the threads and workers start
    start = int(state["next_index"]) if state else 0
    return TrainIterator(iter(step_batches(self._train_batch, start, self.num_threads,
                                           self.workers)), start)

  def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
    """Every row of ``split`` once, in order; the last batch padded with ``mask`` = 0 rows."""
    stream = self.stream(split, train=False)
    for rows, valid in eval_rows(stream.rows_per_epoch, self.global_eval_batch_size,
                                 self.eval_batch_size, self.process_index):
      batch = self._rows(split, rows, train=False)
      batch = {k: np.where(valid[:, None], v, 0) for k, v in batch.items()}
      batch[MASK] = valid.astype(np.float32)
      yield batch

  def abstract_batch(self, global_size: int, *, train: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a global batch of ``global_size`` rows (no text is read)."""
    shape = (global_size, self.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, np.int32) for k in packing.ROW_KEYS}
    if not train:
      batch[MASK] = jax.ShapeDtypeStruct((global_size,), np.float32)
    return batch


def make_pipeline(config: Any, workdir: str | None = None, *, progress: bool = False
                  ) -> DataPipeline:
  """The pipeline a config asks for: examples as stored, or (``data.tokenizer``) a text corpus
  tokenized and packed into rows. ``progress``: bars for their slow one-off passes (the caller's
  choice, e.g. ``train.progress``)."""
  return (TextPipeline if config.data.tokenizer else Pipeline)(config, workdir, progress=progress)
