"""A character-level English corpus for language modelling: Python's own help topics
(``pydoc_data.topics.topics``, about 0.46 MB of reference prose and grammar), or the same text as
documents for a tokenizer (``bundled:text/documents``). It ships with every CPython, so preparing
it needs no network and no package at all."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import sys
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from deepflow.data.bundled.base import BundledBuilder, register_builder, time_split_indices


def corpus() -> str:
  """The help topics concatenated in sorted key order (each ends with a newline)."""
  from pydoc_data.topics import topics
  return "".join(topics[key] for key in sorted(topics))


def paragraphs(text: str) -> list[str]:
  """The non-blank paragraphs (``\n\n``-separated) of a piece of the corpus, in order."""
  return [p for p in text.split("\n\n") if p.strip()]


@dataclasses.dataclass(eq=False)
class TextConfig(tfds.core.BuilderConfig):
  """Chunks of ``seq_len`` characters, or (``documents``) each split's paragraphs as text; the
  last ``test_fraction`` of the character stream is ``test``, the ``validation_fraction`` before
  it ``validation`` (no such split when 0)."""
  seq_len: int = 128
  validation_fraction: float = 0.05
  test_fraction: float = 0.1
  documents: bool = False

  def __post_init__(self):
    if self.seq_len < 1:
      raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
    if self.validation_fraction < 0 or self.test_fraction <= 0 or (
        self.validation_fraction + self.test_fraction >= 1):
      raise ValueError("need validation_fraction >= 0, test_fraction > 0 and their sum < 1, got "
                       f"{self.validation_fraction}, {self.test_fraction}")


@register_builder("text")
class DeepflowPydocText(BundledBuilder):
  """Non-overlapping character chunks ``{'inputs': int32 (seq_len,), 'targets': int32 (seq_len,),
  'offset': int32}``; targets are the inputs shifted by one character, ``offset`` is the index of
  the first input character in the corpus.

  Ids index ``metadata['vocab']``, the sorted unique characters of the whole corpus. The stream is
  cut by position, never shuffled across the cuts: train is the first 85%, validation the next
  5%, test the last 10% (``metadata['boundaries']``); a chunk needs seq_len + 1 characters inside
  its split. Chunks are stored in stream order. Under Python 3.11.7 (464,970 characters, 103
  symbols) the default config (``seq128``) gives train 3,087 / validation 181 / test 363 chunks.
  ``documents`` holds ``{'text': Text}`` instead: the paragraphs of each split's characters (a
  paragraph across a cut is cut too), the documents ``data.tokenizer`` packs into rows.
  The topics change between Python releases, so the corpus is fixed per release:
  ``metadata['python_version']`` and ``metadata['corpus_sha256']`` record which one was used."""
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [
      TextConfig(name="seq128", seq_len=128, description="128-character chunks."),
      TextConfig(name="documents", documents=True,
                 description="Paragraphs as text documents, for data.tokenizer."),
  ]

  @functools.cached_property
  def _data(self) -> tuple[np.ndarray, dict[str, Any]]:
    """The corpus as ids and the dataset metadata, computed once per builder."""
    text = corpus()
    vocab = "".join(sorted(set(text)))
    ids = np.searchsorted(np.array(list(vocab)), np.array(list(text))).astype(np.int32)
    cfg = self.builder_config
    n = len(text)
    test = time_split_indices(n, cfg.test_fraction)
    bounds = {"train": [0, test], "test": [test, n]}
    if cfg.validation_fraction > 0:
      validation = time_split_indices(n, cfg.test_fraction + cfg.validation_fraction)
      bounds.update(train=[0, validation], validation=[validation, test])
    metadata = {
        "vocab": vocab, "vocab_size": len(vocab), "seq_len": cfg.seq_len,
        "corpus_chars": n, "boundaries": bounds,
        "split_sizes": {k: (b - a - 1) // cfg.seq_len for k, (a, b) in bounds.items()},
        "source": "pydoc_data.topics.topics, concatenated in sorted key order",
        "python_version": sys.version.split()[0],
        "corpus_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }
    if cfg.documents:  # no chunks: paragraphs, tokenized by the text pipeline
      del metadata["seq_len"]
      metadata["split_sizes"] = {k: len(paragraphs(text[a:b])) for k, (a, b) in bounds.items()}
    return ids, metadata

  def _info(self) -> tfds.core.DatasetInfo:
    seq_len = self.builder_config.seq_len
    chunks = {
        "inputs": tfds.features.Tensor(shape=(seq_len,), dtype=np.int32),
        "targets": tfds.features.Tensor(shape=(seq_len,), dtype=np.int32),
        "offset": tfds.features.Tensor(shape=(), dtype=np.int32),
    }
    documents = self.builder_config.documents
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()} if documents
                                            else chunks),
        supervised_keys=None if documents else ("inputs", "targets"),
        homepage="https://docs.python.org/3/library/pydoc.html",
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(self._data[1]),
    )

  def _split_generators(self, dl_manager):
    ids, metadata = self._data
    bounds = metadata["boundaries"]
    if self.builder_config.documents:
      text = corpus()
      return {split: self._generate_documents(text[start:stop])
              for split, (start, stop) in bounds.items()}
    return {split: self._generate_examples(ids, start, stop)
            for split, (start, stop) in bounds.items()}

  def _generate_documents(self, text: str):
    for i, paragraph in enumerate(paragraphs(text)):
      yield i, {"text": paragraph}

  def _generate_examples(self, ids: np.ndarray, start: int, stop: int):
    seq_len = self.builder_config.seq_len
    for offset in range(start, stop - seq_len, seq_len):
      yield offset, {"inputs": ids[offset:offset + seq_len],
                     "targets": ids[offset + 1:offset + seq_len + 1], "offset": offset}
