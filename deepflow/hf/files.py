"""A Hugging Face checkpoint directory on disk: ``config.json`` and safetensors weights, one
file or shards named by ``model.safetensors.index.json``; read one tensor at a time, written a
shard at a time.

The safetensors format is an 8-byte little-endian header length, a JSON header (each tensor's
dtype, shape and byte range) and the raw bytes. It is read here directly rather than through the
``safetensors`` library because that library's numpy reader cannot return bfloat16 (the dtype
most checkpoints are in); numpy (with ``ml_dtypes``) can, so a bf16 tensor is read as bf16,
with no float32 copy.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

from deepflow.atomic import atomic_path
from deepflow.registry import ConfigError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
          "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32, "I16": np.int16,
          "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
DOWNLOAD = "download the checkpoint again (huggingface-cli download REPO --local-dir DIR)"


def read_config(directory: str) -> dict:
  """The directory's ``config.json``; a missing directory, file or bad JSON is one line."""
  path = os.path.join(directory, CONFIG)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: no such directory; a Hugging Face checkpoint is a "
                            f"directory with {CONFIG} and *.safetensors")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing: {directory} is not a Hugging Face checkpoint "
                            f"({DOWNLOAD})")
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} is not valid JSON ({e}); {DOWNLOAD}") from e
  if not isinstance(config, dict) or "model_type" not in config:
    raise ConfigError(f"{path} has no model_type; {DOWNLOAD}")
  return config


def weight_files(directory: str) -> dict[str, str]:
  """tensor name -> the file holding it: from the index when there is one, else from
  ``model.safetensors``'s header. A shard the index names but the directory lacks, or no
  weights at all, is one line."""
  index = os.path.join(directory, INDEX)
  if os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ConfigError(f"{index} is not a safetensors index ({e}); {DOWNLOAD}") from e
    missing = sorted({f for f in weight_map.values()
                      if not os.path.isfile(os.path.join(directory, f))})
    if missing:
      raise FileNotFoundError(f"{index} names {len(missing)} shard(s) missing from {directory}: "
                              f"{', '.join(missing[:4])}; {DOWNLOAD}")
    return {name: os.path.join(directory, f) for name, f in weight_map.items()}
  path = os.path.join(directory, WEIGHTS)
  if not os.path.isfile(path):
    others = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".h5")))
    hint = (f" (it has {', '.join(others[:3])}: PyTorch/TF weights; convert them to safetensors, "
            f"or download the safetensors files)" if others else f"; {DOWNLOAD}")
    raise FileNotFoundError(f"{directory} has neither {WEIGHTS} nor {INDEX}{hint}")
  return {name: path for name in header(path)}


def header(path: str) -> dict[str, dict]:
  """A safetensors file's tensor entries (name -> dtype, shape, data_offsets)."""
  try:
    with open(path, "rb") as f:
      (size,) = struct.unpack("<Q", f.read(8))
      entries = json.loads(f.read(size))
  except (OSError, ValueError, struct.error) as e:
    raise ConfigError(f"{path} is not a safetensors file ({e}); {DOWNLOAD}") from e
  entries.pop("__metadata__", None)
  return entries


class Reader:
  """Reads tensors by name from a checkpoint's files, one at a time: each is a read-only map of
  its own bytes, unmapped when the caller drops it, so host memory holds the tensor being
  placed, not the checkpoint (and nothing is copied before the placement's own copy)."""

  def __init__(self, files: dict[str, str]):
    self.files = files
    self._headers: dict[str, tuple[int, dict]] = {}

  def _entry(self, name: str) -> tuple[str, int, dict]:
    path = self.files[name]
    if path not in self._headers:
      with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
      self._headers[path] = (8 + size, header(path))
    start, entries = self._headers[path]
    if name not in entries:
      raise ConfigError(f"{path} lacks tensor {name!r} that the index places there; {DOWNLOAD}")
    return path, start, entries[name]

  def dtype(self, name: str) -> np.dtype:
    path, _, entry = self._entry(name)
    if entry["dtype"] not in DTYPES:
      raise ConfigError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which deepflow "
                        f"does not read; convert the checkpoint to bfloat16 or float32")
    return np.dtype(DTYPES[entry["dtype"]])

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entry(name)[2]["shape"])

  def read(self, name: str) -> np.ndarray:
    path, start, entry = self._entry(name)
    dtype, shape = self.dtype(name), tuple(entry["shape"])
    begin, end = entry["data_offsets"]
    count = int(np.prod(shape, dtype=np.int64))
    if end - begin != count * dtype.itemsize:
      raise ConfigError(f"{path}: tensor {name!r} holds {end - begin} bytes, not the "
                        f"{count * dtype.itemsize} of {shape} {dtype}; {DOWNLOAD}")
    if start + end > os.path.getsize(path):
      raise ConfigError(f"{path} is truncated (tensor {name!r}); {DOWNLOAD}")
    if not count:
      return np.zeros(shape, dtype)
    return np.memmap(path, dtype, mode="r", offset=start + begin, shape=shape)


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  """Writes ``tensors`` as a safetensors file (metadata ``format: pt``, which ``transformers``
  requires) through ``deepflow.atomic``, so a crash leaves no partial file."""
  entries, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, value in tensors.items():
    entries[name] = {"dtype": NAMES[value.dtype], "shape": list(value.shape),
                     "data_offsets": [offset, offset + value.nbytes]}
    offset += value.nbytes
  text = json.dumps(entries, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)
  with atomic_path(path) as tmp, tmp.open("wb") as f:
    f.write(struct.pack("<Q", len(text)) + text)
    for value in tensors.values():
      f.write(np.ascontiguousarray(value).tobytes())


def shards(sizes: list[tuple[str, int]], max_bytes: int) -> Iterator[list[str]]:
  """Names grouped in order into shards of at most ``max_bytes`` (a larger tensor alone)."""
  group, total = [], 0
  for name, size in sizes:
    if group and total + size > max_bytes:
      yield group
      group, total = [], 0
    group.append(name)
    total += size
  if group:
    yield group
