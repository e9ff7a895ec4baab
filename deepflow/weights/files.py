"""Named tensors on disk: ``.safetensors`` (the ``safetensors`` library's format, readable from
PyTorch, NumPy or Rust) and ``.npz``, and the flat names of a model's variables."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from deepflow import pytree
from deepflow.atomic import atomic_path
from deepflow.registry import ConfigError

FORMATS = (".safetensors", ".npz")


def flatten(variables: Any) -> dict[str, np.ndarray]:
  """``{'params': ..., 'batch_stats': ...}`` -> {'params/Dense_0/kernel': array, ...}."""
  return {k: np.asarray(v) for k, v in pytree.flatten(variables).items()}



def read(path: str) -> dict[str, np.ndarray]:
  """The tensors of a .safetensors or .npz file; a missing or unreadable file is a
  FileNotFoundError / ConfigError with one line."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file not found: {path}")
  try:
    if path.endswith(".safetensors"):
      from safetensors.numpy import load_file
      return dict(load_file(path))
    with np.load(path, allow_pickle=False) as npz:
      return {k: npz[k] for k in npz.files}
  except Exception as e:  # noqa: BLE001  both libraries raise several types for a bad file
    raise ConfigError(f"cannot read weights from {path}: {str(e).splitlines()[0]}") from e


def write_safetensors(tensors: dict[str, np.ndarray], path: str,
                      metadata: dict[str, str] | None = None) -> None:
  """Writes ``tensors`` (contiguous host copies) atomically: a crash leaves no partial file."""
  from safetensors.numpy import save_file
  with atomic_path(path) as tmp:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
              metadata=metadata)
