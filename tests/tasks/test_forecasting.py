"""The forecasting task: errors in the data's units beside the persistence baseline, residual
forecasts, no time leakage through the pipeline, and one-line errors."""
import itertools

import jax
import numpy as np
import pytest

from deepflow.data import sources
from deepflow.data.pipeline import INPUTS, TARGETS, Pipeline
from deepflow.registry import ConfigError
from deepflow.train.experiment import Experiment
from tests.helpers import tiny_config

SHARED = "[{'name': 'standardize', 'keys': ('input', 'target')}]"


def forecast_config(data_dir, *overrides, source="bundled:co2"):
  # eval_batch_size 32: 105 test windows, so the last batch is padded.
  return tiny_config(*overrides, model=dict(name="rnn", cell="gru", hidden_size=8),
                     task=dict(name="forecasting", residual=True), data__source=source,
                     data__data_dir=data_dir,
                     data__transforms=[dict(name="standardize", keys=("input", "target"))],
                     data__batch_size=16, data__eval_batch_size=32, train__steps=2)


@pytest.mark.parametrize("residual", [True, False])
def test_metrics_are_in_ppm_beside_persistence(data_dir, tmp_path, residual):
  exp = Experiment(forecast_config(data_dir, f"task.residual={residual}"), str(tmp_path))
  state = exp.init_state()
  metrics = exp.evaluate(state, "test")
  raw = sources.to_memory(exp.pipeline.dataset.split("test")).arrays  # ppm, as stored
  x, y = raw["inputs"], raw["targets"]
  assert len(y) == 105 and 350 < y.mean() < 380
  stats = exp.pipeline.stats[0]
  mean, std = float(stats["mean"].ravel()[0]), float(stats["std"].ravel()[0])
  pred, _ = jax.jit(lambda p, x: exp.task.predict(p, {}, x, None, False))(
      state.params, (x - mean) / std)
  pred = np.asarray(pred) * std + mean
  np.testing.assert_allclose(metrics["mse"], np.mean((pred - y) ** 2), rtol=1e-4)
  np.testing.assert_allclose(metrics["mae"], np.mean(np.abs(pred - y)), rtol=1e-4)
  persistence = x[:, -1, 0:1] - y
  np.testing.assert_allclose(metrics["persistence_rmse"], np.sqrt(np.mean(persistence ** 2)),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["persistence_mae"], np.mean(np.abs(persistence)), rtol=1e-5)
  np.testing.assert_allclose(metrics["rmse_ratio"],
                             metrics["rmse"] / metrics["persistence_rmse"], rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], np.mean(((pred - y) / std) ** 2), rtol=1e-3)


def test_residual_forecasts_move_with_the_level(data_dir, tmp_path):
  """With ``residual`` the model sees the window relative to its last value, so shifting a
  window shifts its forecast by exactly as much."""
  exp = Experiment(forecast_config(data_dir), str(tmp_path))
  state = exp.init_state()
  x = next(iter(exp.pipeline.eval_batches("test")))[INPUTS]
  predict = jax.jit(lambda x: exp.task.predict(state.params, {}, x, None, False)[0])
  np.testing.assert_allclose(predict(x + 3.0), np.asarray(predict(x)) + 3.0, atol=1e-5)


def test_the_time_split_does_not_leak_through_the_pipeline(data_dir):
  """Every training batch ends before the cut, test targets start at or after it, and the
  scaling is fitted on the train windows only."""
  p = Pipeline(forecast_config(data_dir))
  meta = p.spec.metadata
  cut, window, horizon = meta["cut"], meta["window"], meta["horizon"]
  it = p.train_iterator()
  times = np.concatenate([next(it)["time"] for _ in range(2 * (397 // 16))])
  assert set(times) == set(p.train_source.arrays["time"])  # the batches cover the train split
  assert times.min() - window >= 0 and times.max() + horizon <= cut
  test_times = np.concatenate([b["time"][b["mask"] > 0] for b in p.eval_batches("test")])
  assert test_times.min() >= cut
  train_inputs = p.train_source.arrays["inputs"]
  np.testing.assert_allclose(p.stats[0]["mean"].ravel(), [train_inputs.mean()], rtol=1e-5)
  np.testing.assert_allclose(p.stats[0]["std"].ravel(), [train_inputs.std()], rtol=1e-4)
  batch = next(p.eval_batches("test"))
  raw = sources.to_memory(p.dataset.split("test")).arrays["targets"][:len(batch[TARGETS])]
  np.testing.assert_allclose(p.spec.inverse[TARGETS](batch[TARGETS]), raw, rtol=1e-5)


def test_window_longer_than_the_series_is_a_one_line_error(data_dir):
  with pytest.raises(ConfigError) as err:
    Pipeline(forecast_config(data_dir, source="bundled:sunspots/window=400"))
  message = str(err.value)
  assert "\n" not in message and "sunspots" in message and "window=400" in message
  assert "309 steps" in message


def test_configuration_errors(data_dir, tmp_path):
  def build(*overrides):  # a workdir each: fitted statistics are kept per run
    return Experiment(forecast_config(data_dir, *overrides), str(tmp_path / str(next(runs))))
  runs = itertools.count()
  with pytest.raises(ConfigError, match="same units"):  # inputs scaled, targets raw
    build("data.transforms=[{'name': 'standardize'}]")
  with pytest.raises(ConfigError, match="has no inverse"):
    build("data.transforms=[{'name': 'impute', 'keys': ('target',)}]")
  with pytest.raises(ConfigError, match="task.feature"):
    build("task.feature=1")
  build("task.residual=False", "data.transforms=[{'name': 'standardize'}]")  # raw targets: fine
