"""Normalization and imputation against their formulas, statistics from the train split only and
kept in the workdir, and NaN inputs without imputation refused (train and eval)."""
import os

import numpy as np
import pytest

from deepflow.data import transforms as T
from deepflow.data.pipeline import INPUTS, STATS_FILE, Pipeline
from deepflow.registry import ConfigError
from tests.helpers import tiny_config

RNG = np.random.default_rng(0)
TRAIN = RNG.normal(3.0, 2.0, (50, 4)).astype(np.float32)
EVAL = RNG.normal(0.0, 5.0, (10, 4)).astype(np.float32)


def fit_apply(transform, train, other):
  stats = transform.fit([train])
  return transform.apply(stats, other, None)


def test_standardize_per_feature_uses_train_statistics():
  out = fit_apply(T.standardize(), TRAIN, EVAL)
  np.testing.assert_allclose(out, (EVAL - TRAIN.mean(0)) / TRAIN.std(0), rtol=1e-5, atol=1e-5)
  train_out = fit_apply(T.standardize(), TRAIN, TRAIN)
  np.testing.assert_allclose(train_out.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(train_out.std(0), 1, rtol=1e-4)


@pytest.mark.parametrize("per, axes", [("channel", (0, 1, 2)), ("global", (0, 1, 2, 3)),
                                       ("feature", (0,)), ("auto", (0, 1, 2))])
def test_standardize_axes_on_images(per, axes):
  images = RNG.uniform(0, 16, (20, 5, 5, 3)).astype(np.float32)
  out = fit_apply(T.standardize(per=per), images, images[:3])
  mean, std = images.mean(axes, keepdims=True), images.std(axes, keepdims=True)
  np.testing.assert_allclose(out, (images[:3] - mean) / std, rtol=1e-4, atol=1e-4)


def test_auto_is_per_channel_for_sequences_so_targets_can_share_statistics():
  series = RNG.normal(10, 3, (30, 12, 1)).astype(np.float32)
  stats = T.standardize().fit([series])
  assert stats["mean"].shape == (1, 1)
  targets = RNG.normal(10, 3, (30, 1)).astype(np.float32)
  out = T.standardize().apply(stats, targets, None)
  np.testing.assert_allclose(out, (targets - series.mean()) / series.std(), rtol=1e-4)


def test_constant_train_feature_is_centred_not_blown_up():
  train = np.stack([np.arange(10.0), np.zeros(10)], 1).astype(np.float32)
  out = fit_apply(T.standardize(), train, np.array([[1.0, 2.0]], np.float32))
  np.testing.assert_allclose(out[0, 1], 2.0)
  out = fit_apply(T.minmax(), train, np.array([[1.0, 2.0]], np.float32))
  np.testing.assert_allclose(out[0], [1 / 9, 2.0], rtol=1e-5)


def test_minmax_formula():
  out = fit_apply(T.minmax(low=-1.0, high=1.0), TRAIN, EVAL)
  lo, hi = TRAIN.min(0), TRAIN.max(0)
  np.testing.assert_allclose(out, -1 + 2 * (EVAL - lo) / (hi - lo), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fit_apply(T.minmax(), TRAIN, TRAIN).min(0), 0, atol=1e-6)
  np.testing.assert_allclose(fit_apply(T.minmax(), TRAIN, TRAIN).max(0), 1, atol=1e-6)
  images = RNG.uniform(0, 16, (20, 5, 5, 3)).astype(np.float32)
  out = fit_apply(T.minmax(per="global"), images, images)
  assert out.min() == pytest.approx(0) and out.max() == pytest.approx(1)


def one_chunk(sample):
  return lambda: [sample]


def in_chunks(sample, size):
  n = len(next(iter(sample.values())))
  return lambda: ({k: v[i:i + size] for k, v in sample.items()} for i in range(0, n, size))


def knock(x, fraction=0.2, seed=1):
  x = x.copy()
  x[np.random.default_rng(seed).random(x.shape) < fraction] = np.nan
  return x


@pytest.mark.parametrize("strategy", ["mean", "median", "constant"])
def test_impute_fills_with_train_statistics(strategy):
  train, other = knock(TRAIN), knock(EVAL, seed=2)
  transform = T.impute(strategy=strategy, fill_value=-7.0, indicator=True)
  out = fit_apply(transform, train, other)
  fill = {"mean": np.nanmean(train, 0), "median": np.nanmedian(train, 0),
          "constant": np.full(4, -7.0)}[strategy]
  missing = np.isnan(other)
  np.testing.assert_allclose(out[:, :4], np.where(missing, fill, other), rtol=1e-6)
  np.testing.assert_array_equal(out[:, 4:], missing.astype(np.float32))
  assert transform.handles_missing and not np.isnan(out).any()


def test_nan_without_imputation_is_refused_in_train_and_eval():
  chain = [T.standardize()]
  with pytest.raises(ConfigError, match=r"missing values \(NaN, .*add dict\(name='impute'\)"):
    T.fit_chain(chain, one_chunk({"x": knock(TRAIN), "y": np.zeros(50)}), "x", "y")
  stats = T.fit_chain(chain, one_chunk({"x": TRAIN, "y": np.zeros(50)}), "x", "y")
  with pytest.raises(ConfigError, match="eval batch has missing values"):
    T.apply_chain(chain, stats, {"x": knock(EVAL), "y": np.zeros(10)}, "x", "y", train=False)
  imputed = [T.impute(), T.standardize()]
  stats = T.fit_chain(imputed, one_chunk({"x": knock(TRAIN), "y": np.zeros(50)}), "x",
                       "y")
  out = T.apply_chain(imputed, stats, {"x": knock(EVAL), "y": np.zeros(10)}, "x", "y",
                      train=False)
  assert not np.isnan(out["x"]).any()


def test_chain_fits_each_step_on_the_output_of_the_previous_one():
  chain = [T.impute(strategy="median"), T.standardize()]
  train = knock(TRAIN)
  stats = T.fit_chain(chain, one_chunk({"x": train, "y": np.zeros(50)}), "x", "y")
  filled = np.where(np.isnan(train), np.nanmedian(train, 0), train)
  np.testing.assert_allclose(stats[1]["mean"], filled.mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats[1]["std"], filled.std(0), rtol=1e-5)


@pytest.mark.parametrize("per", ["auto", "feature", "global"])
@pytest.mark.parametrize("block", [T.Moments.BLOCK, 200])  # 200: a chunk reduced in blocks
def test_chunked_fit_equals_numpy_on_the_whole_sample(per, block, monkeypatch):
  """Moments merged over uneven chunks (one of them all-NaN in places) against numpy's
  nanmean/nanstd/nanmin/nanmax of the concatenated float64 sample."""
  monkeypatch.setattr(T.Moments, "BLOCK", block)
  images = knock(RNG.normal(100, 40, (103, 6, 5, 3)).astype(np.float32), 0.1)
  images[:7, 0, 0, 0] = np.nan
  axes = {"auto": (0, 1, 2), "feature": (0,), "global": (0, 1, 2, 3)}[per]
  reference = images.astype(np.float64)
  for size in (1, 7, 50, 103):
    chunks = [images[i:i + size] for i in range(0, 103, size)]
    stats = T.standardize(per=per).fit(chunks)
    np.testing.assert_allclose(stats["mean"], np.nanmean(reference, axes, keepdims=True)[0],
                               rtol=1e-6)
    np.testing.assert_allclose(stats["std"], np.nanstd(reference, axes, keepdims=True)[0],
                               rtol=1e-5)
    stats = T.minmax(per=per).fit(chunks)
    np.testing.assert_array_equal(stats["min"], np.nanmin(reference, axes, keepdims=True)[0])
    np.testing.assert_array_equal(stats["max"], np.nanmax(reference, axes, keepdims=True)[0])
  table = knock(TRAIN)
  for strategy, reference in (("mean", np.nanmean), ("median", np.nanmedian)):
    stats = T.impute(strategy=strategy).fit([table[:13], table[13:14], table[14:]])
    np.testing.assert_allclose(stats["fill"], reference(table, 0), rtol=1e-6)


def test_statistics_of_an_empty_sample_are_one_error():
  with pytest.raises(ConfigError, match="at least one train example"):
    T.standardize().fit([])


def test_chain_fits_in_chunks_and_checks_nan_in_the_same_passes():
  chain = [T.impute(strategy="mean"), T.standardize()]
  train = knock(TRAIN)
  stats = T.fit_chain(chain, in_chunks({"x": train, "y": np.zeros(50)}, 8), "x", "y")
  filled = np.where(np.isnan(train), np.nanmean(train, 0), train).astype(np.float64)
  np.testing.assert_allclose(stats[1]["mean"], filled.mean(0), rtol=1e-6)
  np.testing.assert_allclose(stats[1]["std"], filled.std(0), rtol=1e-5)
  late_nan = TRAIN.copy()
  late_nan[-1, 2] = np.nan  # in the last chunk only
  with pytest.raises(ConfigError, match=r"'x' has missing values \(NaN, 0.5% of entries\)"):
    T.fit_chain([T.standardize()], in_chunks({"x": late_nan, "y": np.zeros(50)}, 8), "x", "y")
  with pytest.raises(ConfigError, match="'y' has missing values"):
    T.fit_chain([], in_chunks({"x": TRAIN, "y": np.full(50, np.nan)}, 8), "x", "y")
  # A fit that reads only its first chunk still leaves the check every chunk.
  late_target = np.zeros(50)
  late_target[-1] = np.nan
  for chain in ([T.impute(strategy="constant")], [T.standardize(), T.impute(strategy="constant")]):
    with pytest.raises(ConfigError, match=r"'y' has missing values \(NaN, 2.0% of entries\)"):
      T.fit_chain(chain, in_chunks({"x": TRAIN, "y": late_target}, 8), "x", "y")


def missing_config(data_dir, transforms):
  return tiny_config(data__source="bundled:breast_cancer_missing", data__data_dir=data_dir,
                     data__batch_size=40, data__eval_batch_size=40, data__transforms=transforms)


def test_pipeline_keeps_train_statistics_in_the_workdir(data_dir, tmp_path):
  config = missing_config(data_dir, [dict(name="impute", strategy="median", indicator=True),
                                     dict(name="standardize")])
  pipeline = Pipeline(config, str(tmp_path))
  path = os.path.join(tmp_path, STATS_FILE)
  assert os.path.exists(path)
  train = pipeline.train_source.arrays["features"]
  saved = T.load_stats(path)
  np.testing.assert_allclose(saved[0]["fill"], np.nanmedian(train, 0), rtol=1e-6)
  assert pipeline.spec.input_shape == (60,)  # 30 features + 30 missing indicators
  # A second pipeline on the same workdir reads the saved statistics instead of refitting.
  T.save_stats(path, [{"fill": saved[0]["fill"] + 1.0}, saved[1]])
  again = Pipeline(config, str(tmp_path))
  np.testing.assert_allclose(again.stats[0]["fill"], saved[0]["fill"] + 1.0)
  batch = next(again.eval_batches("test"))
  assert not np.isnan(batch[INPUTS]).any()


def test_pipeline_refuses_nan_data_without_imputation(data_dir):
  with pytest.raises(ConfigError, match="missing values"):
    Pipeline(missing_config(data_dir, [dict(name="standardize")]))
