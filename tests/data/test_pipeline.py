"""The input pipeline: deterministic, reshuffled per epoch, full eval coverage, per-host slices,
train-only statistics, and offline TFDS behaviour."""
import socket

import numpy as np
import pytest

from deepflow.data import sources
from deepflow.data.pipeline import INPUTS, MASK, TARGETS, Pipeline
from deepflow.registry import SOURCE_KINDS
from tests.helpers import tiny_config


def test_batches_are_a_function_of_seed_and_step():
  a, b = Pipeline(tiny_config()), Pipeline(tiny_config())
  ia, ib = a.train_iterator(), b.train_iterator()
  for _ in range(5):
    x, y = next(ia), next(ib)
    np.testing.assert_array_equal(x[INPUTS], y[INPUTS])
  other = next(Pipeline(tiny_config("seed=1")).train_iterator())
  assert not np.array_equal(other[INPUTS], next(a.train_iterator())[INPUTS])


def test_each_epoch_is_a_new_permutation_of_the_train_split():
  p = Pipeline(tiny_config("data.transforms=[]"))  # raw values: rows identify examples
  n = len(p.train_source)
  per_epoch = n // p.batch_size
  it = p.train_iterator()
  seen = np.concatenate([next(it)[INPUTS] for _ in range(2 * per_epoch)])
  rows = p.train_source.arrays["image"]
  index = {r.tobytes(): i for i, r in enumerate(rows)}
  order = np.array([index[r.tobytes()] for r in seen])
  first, second = order[:per_epoch * p.batch_size], order[n:n + per_epoch * p.batch_size]
  assert len(set(order[:n])) == n  # one epoch: every example once
  assert not np.array_equal(first, second)  # reshuffled


def test_resume_from_iterator_state():
  p = Pipeline(tiny_config())
  it = p.train_iterator()
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = next(it)
  resumed = next(p.train_iterator(state))
  np.testing.assert_array_equal(expected[INPUTS], resumed[INPUTS])


def test_eval_covers_every_example_exactly_once():
  p = Pipeline(tiny_config("data.eval_batch_size=48", "data.transforms=[]"))
  batches = list(p.eval_batches("test"))
  assert {b[INPUTS].shape[0] for b in batches} == {48}  # fixed shape: one compilation
  mask = np.concatenate([b[MASK] for b in batches]) > 0
  rows = np.concatenate([b[INPUTS] for b in batches])[mask]
  source = p.dataset.split("test").arrays["image"]
  assert mask.sum() == len(source) == 512
  np.testing.assert_array_equal(rows, source)


def test_hosts_read_disjoint_slices_of_the_same_global_batch():
  single = next(Pipeline(tiny_config()).train_iterator())
  parts = []
  for index in range(2):
    p = Pipeline(tiny_config())
    p.process_index, p.process_count, p.batch_size = index, 2, p.global_batch_size // 2
    parts.append(next(p.train_iterator()))
  np.testing.assert_array_equal(np.concatenate([x[INPUTS] for x in parts]), single[INPUTS])


def test_standardize_uses_train_statistics_only():
  p = Pipeline(tiny_config("data.transforms=[{'name': 'standardize', 'per': 'feature'}]"))
  train = p.dataset.split("train").arrays["image"]
  test = p.dataset.split("test").arrays["image"]
  got = next(p.eval_batches("test"))[INPUTS][:5]
  want = (test[:5] - train.mean(0)) / train.std(0)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert p.spec.input_shape == (8, 8, 1) and p.spec.num_classes == 10


def test_bundled_digits_is_prepared_offline(data_dir):
  p = Pipeline(tiny_config("data.source=bundled:digits", f"data.data_dir={data_dir}"))
  assert p.spec.train_size == 1437 and p.spec.num_classes == 10
  b = next(p.train_iterator())
  assert b[INPUTS].shape == (32, 8, 8, 1) and b[TARGETS].shape == (32,)
  assert abs(float(p.train_source.arrays["image"].mean()) - 4.88) < 0.1  # raw digits scale


def test_unprepared_tfds_dataset_fails_fast(tmp_path, monkeypatch):
  """It fails before any network access (no download, no retries), not after a timeout."""
  attempts = []

  def refuse(*args, **kwargs):
    attempts.append(args)
    raise OSError("network access refused by the test")
  for name in ("connect", "connect_ex"):
    monkeypatch.setattr(socket.socket, name, refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
  monkeypatch.setattr(socket, "getaddrinfo", refuse)
  with pytest.raises(sources.DatasetNotFoundError, match="deepflow data prepare mnist --data_dir"):
    Pipeline(tiny_config("data.source=tfds:mnist", f"data.data_dir={tmp_path}"))
  assert not attempts



def test_a_new_source_kind_is_one_registration():
  """``SOURCE_KINDS`` is where ``data.source``'s kinds come from: one registered here is checked
  when the config is validated and opened by the pipeline, with no other change."""
  opened = []

  def check(rest):
    if rest != "digits":
      raise sources.ConfigError(f"unknown test dataset {rest!r}")

  def open_kind(rest, data_dir, seed):
    opened.append((rest, seed))
    return sources.synthetic_images(seed=seed, train_size=64, test_size=32)
  SOURCE_KINDS.register("test_kind")(sources.SourceKind(check, open_kind))
  p = Pipeline(tiny_config("data.source=test_kind:digits"))
  assert opened == [("digits", 0)] and p.spec.train_size == 64
  with pytest.raises(sources.ConfigError, match="unknown test dataset 'nope'"):
    tiny_config("data.source=test_kind:nope")
