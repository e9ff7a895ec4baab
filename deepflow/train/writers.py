"""Where metrics go: ``metrics.jsonl`` (one JSON object per line) and TensorBoard event files.

Only process 0 writes; other processes get a writer that does nothing."""
from __future__ import annotations

import json
import os
from typing import Mapping

import jax


class MetricWriter:
  """Appends ``{"step": s, "split": name, metric: value, ...}`` lines and TensorBoard scalars."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled and tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for name, value in metrics.items():
        self._tb.add_scalar(f"{split}/{name}", float(value), int(step))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """All records of a run's ``metrics.jsonl``."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
