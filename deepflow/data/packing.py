"""Packing tokenized documents into fixed-length rows, with document boundaries kept.

Each document of ``n`` tokens becomes ``n + 1`` (input, target) pairs: inputs ``[BOS, t1..tn]``,
targets ``[t1..tn, EOS]``, so every target is predicted from its own document only and the
first token is predicted from BOS. A split is one stream of such pairs, documents in a given
order (a fresh permutation per training epoch, the stored order for evaluation), cut into rows
of ``seq_len`` pairs; a document may run on into the next row. Per position a row holds:

  inputs, targets  the token pair (0 where a row is padded)
  segments         1, 2, ... for the documents in the row, in order; 0 for padding
  positions        the position inside the document's piece in this row (0 at its first pair)

The model attends only within a segment (``segments`` -> attention mask) and positions restart
per segment, so a document packed after others is computed exactly as if it were alone; the loss
counts every position with a non-zero segment. Row ``r`` of a stream is a pure function of
(order, lengths, r): with the per-document lengths known (one tokenizing pass over the split),
any batch is computed directly from (seed, step), as the resumable loader needs.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import numpy as np

from deepflow.data.pipeline import INPUTS, TARGETS

SEGMENTS, POSITIONS = "segments", "positions"
ROW_KEYS = (INPUTS, TARGETS, SEGMENTS, POSITIONS)

Span = tuple[int, int, int]  # (document index into the split, first pair, end pair)


def document_pairs(tokens: Sequence[int], bos: int, eos: int) -> tuple[np.ndarray, np.ndarray]:
  """A document's (inputs, targets): ``[BOS] + tokens`` and ``tokens + [EOS]``."""
  tokens = np.asarray(tokens, np.int32)
  return (np.concatenate([[bos], tokens]).astype(np.int32),
          np.concatenate([tokens, [eos]]).astype(np.int32))


class PackedStream:
  """Rows of ``seq_len`` pairs cut from a split's documents, taken in ``order(epoch)``.

  ``lengths[d]`` is document ``d``'s number of pairs (tokens + 1). With ``drop_remainder`` (for
  training) an epoch has ``total // seq_len`` rows and rows carry on into the next epoch's
  order; without, the one epoch has ``ceil(total / seq_len)`` rows, the last one padded."""

  def __init__(self, lengths: np.ndarray, seq_len: int,
               order: Callable[[int], np.ndarray] | None = None, drop_remainder: bool = True):
    self.lengths = np.asarray(lengths, np.int64)
    self.seq_len, self._order = seq_len, order
    self._epoch = functools.lru_cache(maxsize=2)(self._stream)  # per stream: rows cross epochs
    total = int(self.lengths.sum())
    self.rows_per_epoch = total // seq_len if drop_remainder else -(-total // seq_len)
    if self.rows_per_epoch == 0:
      raise ValueError(f"the split holds {total} tokens, fewer than one row of {seq_len}")

  def __getstate__(self) -> dict:
    """Pickled (to ``data.workers`` processes) without the per-epoch cache, rebuilt there."""
    return {k: v for k, v in self.__dict__.items() if k != "_epoch"}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._epoch = functools.lru_cache(maxsize=2)(self._stream)

  def _stream(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(documents in stream order, stream position where each one ends)."""
    order = (np.arange(len(self.lengths)) if self._order is None
             else np.asarray(self._order(epoch)))
    return order, np.cumsum(self.lengths[order])

  def spans(self, row: int) -> list[Span]:
    """The pieces of documents that row ``row`` holds, in order."""
    epoch, index = divmod(int(row), self.rows_per_epoch)
    order, ends = self._epoch(epoch)
    start, stop = index * self.seq_len, (index + 1) * self.seq_len
    out = []
    k = int(np.searchsorted(ends, start, side="right"))
    while k < len(order) and ends[k] - self.lengths[order[k]] < stop:
      begin = int(ends[k] - self.lengths[order[k]])
      out.append((int(order[k]), max(start, begin) - begin, min(stop, int(ends[k])) - begin))
      k += 1
    return out


def pack_row(pieces: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int
             ) -> dict[str, np.ndarray]:
  """One row from pieces of documents' (inputs, targets), in order, padded to ``seq_len``."""
  total = sum(len(inputs) for inputs, _ in pieces)
  if total > seq_len:  # checked first: numpy would fail mid-row with a broadcast error
    raise ValueError(f"pieces of {total} pairs do not fit a row of {seq_len}")
  row = {key: np.zeros(seq_len, np.int32) for key in ROW_KEYS}
  at = 0
  for segment, (inputs, targets) in enumerate(pieces, start=1):
    n = len(inputs)
    row[INPUTS][at:at + n], row[TARGETS][at:at + n] = inputs, targets
    row[SEGMENTS][at:at + n] = segment
    row[POSITIONS][at:at + n] = np.arange(n)
    at += n
  return row


def pack_rows(stream: PackedStream, rows: Sequence[int],
              encode: Callable[[Sequence[int]], dict[int, tuple[np.ndarray, np.ndarray]]]
              ) -> dict[str, np.ndarray]:
  """Rows of ``stream`` stacked into a batch; ``encode(documents)`` gives each document's
  (inputs, targets) pairs (each document is read and tokenized once per batch)."""
  spans = [stream.spans(r) for r in rows]
  pairs = encode(sorted({doc for row in spans for doc, _, _ in row}))
  batch = [pack_row([(pairs[d][0][a:b], pairs[d][1][a:b]) for d, a, b in row], stream.seq_len)
           for row in spans]
  return {key: np.stack([r[key] for r in batch]) for key in ROW_KEYS}
