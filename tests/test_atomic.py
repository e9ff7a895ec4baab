"""deepflow.atomic: a file is replaced whole, and a failed write leaves the old one untouched."""
import numpy as np
import pytest

from deepflow.atomic import atomic_path, write_atomic


def test_write_replaces_the_file_whole(tmp_path):
  path = tmp_path / "record.json"
  write_atomic(path, "old")
  write_atomic(str(path), b"new")
  assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "weights.npz"
  with atomic_path(path) as tmp:
    np.savez(tmp, w=np.arange(3))  # the suffix is kept, so numpy writes exactly ``tmp``
  with pytest.raises(RuntimeError):
    with atomic_path(path) as tmp:
      np.savez(tmp, w=np.zeros(3))
      raise RuntimeError("crash mid-write")
  with np.load(path) as f:
    np.testing.assert_array_equal(f["w"], np.arange(3))
  assert [p.name for p in tmp_path.iterdir()] == ["weights.npz"]
