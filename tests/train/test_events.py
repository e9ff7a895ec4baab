"""TensorBoard event files: what deepflow writes is read back by TensorBoard's own loader (with
its CRC checks) as the scalars that were written, locally and as an object store gets them."""
import glob
import os

import numpy as np
import pytest

from deepflow.train import events
from deepflow.train.writers import MetricWriter


def read_scalars(logdir) -> list[tuple[int, str, float]]:
  """(step, tag, value) of every scalar in ``logdir``'s one event file, by TensorBoard."""
  from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
  (path,) = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
  loaded = list(LegacyEventFileLoader(path).Load())
  assert loaded[0].file_version == events.FILE_VERSION
  return [(e.step, v.tag, v.simple_value) for e in loaded[1:] for v in e.summary.value]


def test_crc32c_matches_tensorboards():
  from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
  assert events.crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
  for data in (b"", b"\x00" * 8, bytes(range(256)), b"brain.Event:2"):
    assert events.masked_crc32c(data) == masked_crc32c(data)


@pytest.mark.parametrize("remote", [False, True])
def test_tensorboard_reads_the_scalars_written(tmp_path, remote):
  writer = events.EventFileWriter(str(tmp_path), remote=remote)
  written = [(0, {"train/loss": 2.5, "train/accuracy": 0.125}), (300, {"test/loss": 1e-7}),
             (2**40, {"train/loss": float("inf"), "train/huge": 1e39, "train/small": -3.3})]
  for step, scalars in written:
    writer.add_scalars(step, scalars)
  writer.flush()
  with np.errstate(over="ignore"):  # 1e39 is out of float32's range: inf, as in a cast
    expected = [(step, tag, np.float32(value)) for step, scalars in written
                for tag, value in scalars.items()]
  assert read_scalars(tmp_path) == expected


def test_a_runs_tensorboard_scalars_are_its_metrics(tmp_path):
  writer = MetricWriter(str(tmp_path))
  writer.write(3, "train", {"loss": 0.75, "learning_rate": 1e-3})
  writer.write(3, "test", {"accuracy": 0.5})
  writer.close()
  assert read_scalars(tmp_path / "tensorboard") == [
      (3, "train/loss", 0.75), (3, "train/learning_rate", np.float32(1e-3)),
      (3, "test/accuracy", 0.5)]


@pytest.mark.parametrize("remote", [False, True])
def test_writers_opened_together_keep_their_own_files(tmp_path, remote):
  first = events.EventFileWriter(str(tmp_path), remote=remote)
  second = events.EventFileWriter(str(tmp_path), remote=remote)  # within the same second
  first.add_scalars(1, {"train/loss": 1.0})
  second.add_scalars(2, {"train/loss": 2.0})
  first.flush()
  second.flush()
  from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
  scalars = {}
  for writer in (first, second):
    loaded = list(LegacyEventFileLoader(str(writer.path)).Load())
    assert loaded[0].file_version == events.FILE_VERSION and len(loaded) == 2
    scalars[writer.path] = [(e.step, v.simple_value) for e in loaded[1:] for v in e.summary.value]
  assert sorted(scalars.values()) == [[(1, 1.0)], [(2, 2.0)]]
