"""Tokenization: text features (one string per example, e.g. ``tfds:imdb_reviews``' ``text``)
to fixed-length int ids, listed in ``data.transforms`` like any transform.

``dict(name='tokenize', level='word', length=256, vocab_size=10000)`` fits a word vocabulary on
the train split (saved with the other fitted statistics, so eval and resumption reuse it) and
maps every example to ``length`` ids, truncated or padded with 0. ``level='byte'`` needs no
vocabulary: UTF-8 bytes, id = byte + 1. Set the model's ``vocab_size`` to the transform's
(``vocab_size``, or 257 for bytes).
"""
from __future__ import annotations

import collections
import re
from typing import Iterable

import numpy as np

from deepflow.data.transforms import Stats, Transform
from deepflow.registry import ConfigError, TRANSFORMS

PAD, UNKNOWN = 0, 1
BYTE_VOCAB = 257  # 256 byte values shifted by one, 0 = padding
LEVELS = ("word", "byte")
# Words (letters, digits, apostrophes inside a word) and single punctuation marks; markup such
# as IMDB's "<br />" splits into punctuation and 'br', which the vocabulary learns like a word.
WORD = re.compile(r"[\w']+|[^\w\s]")


def _texts(values: np.ndarray) -> Iterable[str]:
  """Each example's text as str (TFDS gives str or UTF-8 bytes, numpy 'S' or object arrays)."""
  for v in np.asarray(values).reshape(-1):
    yield v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)


def words(text: str, lowercase: bool = True) -> list[str]:
  return WORD.findall(text.lower() if lowercase else text)


@TRANSFORMS.register("tokenize")
def tokenize(level: str = "word", length: int = 256, vocab_size: int = 10000,
             lowercase: bool = True, keys: tuple[str, ...] = ("input",)) -> Transform:
  """Text -> int32 ids (B, ``length``): the first ``length`` tokens, padded with 0.

  ``'word'``: the train split's ``vocab_size - 2`` most frequent words (ties alphabetical) get
  ids 2, 3, ... in that order; 1 is any other word, 0 padding. ``'byte'``: id = UTF-8 byte + 1."""
  if level not in LEVELS:
    raise ConfigError(f"transform 'tokenize': level {level!r}; known: {', '.join(LEVELS)}")
  if not isinstance(length, int) or length < 1:
    raise ConfigError(f"transform 'tokenize': length must be a positive integer, got {length!r}")
  if level == "word" and (not isinstance(vocab_size, int) or vocab_size < 3):
    raise ConfigError(f"transform 'tokenize': vocab_size must be an integer >= 3 (padding, "
                      f"unknown and one word), got {vocab_size!r}")
  lookup: dict[int, dict[str, int]] = {}  # fitted vocabulary -> word ids, built once per stats

  def fit(chunks) -> Stats:
    if level == "byte":
      return {}
    counts = collections.Counter(w for values in chunks for text in _texts(values)
                                 for w in words(text, lowercase))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:vocab_size - 2]
    return {"vocab": np.array([w for w, _ in ranked], dtype=str)}

  def ids_of(stats, text: str) -> list[int]:
    if level == "byte":
      return [b + 1 for b in text.encode("utf-8")[:length]]
    key = id(stats["vocab"])
    if key not in lookup:
      lookup[key] = {w: i + 2 for i, w in enumerate(stats["vocab"].tolist())}
    table = lookup[key]
    return [table.get(w, UNKNOWN) for w in words(text, lowercase)[:length]]

  def apply(stats, values, rng):
    out = np.full((np.size(values), length), PAD, np.int32)
    for row, text in enumerate(_texts(values)):
      ids = ids_of(stats, text)
      out[row, :len(ids)] = ids
    return out
  return Transform(fit, apply, keys, numeric=False)
