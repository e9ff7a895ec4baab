"""TensorBoard event files of scalars, written without TensorFlow, PyTorch or tensorboardX.

An event file is a sequence of TFRecords (length, masked CRC-32C of the length, payload, masked
CRC-32C of the payload), each payload an ``Event`` protocol buffer; the first one names the file
version, the others hold ``Summary`` values. deepflow writes only scalars, whose messages are
small enough to encode by hand: this module spares every run the import of a tensorboard writer
library (tensorboardX imports PyTorch when it is installed: seconds before the first step).

Field numbers are those of tensorboard/compat/proto/event.proto and summary.proto:
``Event{1: wall_time double, 2: step int64, 3: file_version string, 5: summary Summary}``,
``Summary{1: repeated Value}``, ``Summary.Value{1: tag string, 2: simple_value float}``.
"""
from __future__ import annotations

import os
import socket
import struct
import time
import uuid
from typing import Mapping

import numpy as np
from etils import epath

FILE_VERSION = "brain.Event:2"


def _crc32c_table() -> tuple[int, ...]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
    table.append(crc)
  return tuple(table)


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of ``data``, as TFRecord frames use it."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The TFRecord mask: rotate right by 15 bits and add a constant (mod 2**32)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload: bytes) -> bytes:
  """One TFRecord frame around ``payload``."""
  length = struct.pack("<Q", len(payload))
  return (length + struct.pack("<I", masked_crc32c(length)) + payload
          + struct.pack("<I", masked_crc32c(payload)))


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # int64 fields: negatives as two's complement, ten bytes
  out = bytearray()
  while True:
    low, value = value & 0x7F, value >> 7
    if not value:
      out.append(low)
      return bytes(out)
    out.append(low | 0x80)


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited field (wire type 2): a string or a nested message."""
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _float32(value: float) -> bytes:
  """Little-endian float32; out-of-range values become +-inf as in a float32 cast."""
  with np.errstate(over="ignore"):
    return np.asarray(value, dtype="<f4").tobytes()


def event(wall_time: float, step: int, *, file_version: str | None = None,
          scalars: Mapping[str, float] | None = None) -> bytes:
  """An ``Event`` message: the file-version header, or a summary of scalar values."""
  message = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
  if file_version is not None:
    message += _field(3, file_version.encode())
  if scalars:
    values = b"".join(
        _field(1, _field(1, tag.encode()) + _varint(2 << 3 | 5) + _float32(value))
        for tag, value in scalars.items())
    message += _field(5, values)
  return message


class EventFileWriter:
  """Writes scalar summaries to a new event file in ``logdir``, as TensorBoard reads them.

  Local files are appended to at once; object stores (``gs://...``) cannot append, so there the
  file is rewritten whole at each flush (it holds one record per logged step and split)."""

  def __init__(self, logdir: str, *, remote: bool):
    directory = epath.Path(logdir)
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time()
    # Two writers opened within a second (a quick restart, two processes) must not share a
    # file: the process id and a random tag make each name unique, as TensorFlow's writer does.
    self.path = directory / (f"events.out.tfevents.{int(now)}.{socket.gethostname()}."
                             f"{os.getpid()}.{uuid.uuid4().hex[:8]}")
    self.remote = remote
    self._records: list[bytes] = []
    self._append(tfrecord(event(now, 0, file_version=FILE_VERSION)))

  def add_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    self._append(tfrecord(event(time.time(), step, scalars=scalars)))

  def _append(self, record: bytes) -> None:
    if self.remote:
      self._records.append(record)
    else:
      with open(self.path, "ab") as f:
        f.write(record)

  def flush(self) -> None:
    if self.remote:
      self.path.write_bytes(b"".join(self._records))
