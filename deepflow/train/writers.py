"""Where metrics go: ``metrics.jsonl`` (one JSON object per line) and TensorBoard event files.

Only process 0 writes; other processes get a writer that does nothing. The workdir may be a
local path or a cloud URL (``gs://...``, through ``etils.epath``); object stores cannot append,
so there the file is rewritten whole at each flush (it holds one line per logged step)."""
from __future__ import annotations

import json
import os
from typing import Mapping

import jax
from etils import epath

from deepflow.train.events import EventFileWriter


class MetricWriter:
  """Appends ``{"step": s, "split": name, metric: value, ...}`` lines and TensorBoard scalars."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.remote = is_remote(workdir)
    self._lines = self.path.read_text().splitlines(keepends=True) if (
        self.enabled and self.remote and self.path.exists()) else []
    self._tb = None
    if self.enabled and tensorboard:
      self._tb = EventFileWriter(os.path.join(workdir, "tensorboard"), remote=self.remote)

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
    line = json.dumps(record) + "\n"
    if self.remote:
      self._lines.append(line)
    else:
      with open(self.path, "a") as f:
        f.write(line)
    if self._tb is not None:
      self._tb.add_scalars(int(step), {f"{split}/{k}": float(v) for k, v in metrics.items()})

  def flush(self) -> None:
    if self.enabled and self.remote:
      self.path.write_text("".join(self._lines))
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    self.flush()


def read_metrics(workdir: str) -> list[dict]:
  """All records of a run's ``metrics.jsonl``."""
  text = (epath.Path(workdir) / "metrics.jsonl").read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def is_remote(path: str) -> bool:
  """True for URLs such as ``gs://bucket/run`` (object stores), False for local paths."""
  return "://" in os.fspath(path)
