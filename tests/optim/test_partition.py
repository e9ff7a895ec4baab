"""Freezing and per-group learning rates (deepflow.optim.partition) against references: frozen
parameters and statistics do not move, a multiplier scales plain SGD's update exactly."""
import jax
import numpy as np
import pytest

from deepflow import parallel
from deepflow.registry import ConfigError
from deepflow.train.experiment import Experiment
from deepflow.weights import files
from tests.helpers import tiny_config

MLP = dict(name="mlp", hidden=(16,))


def experiment(*overrides, model=MLP):
  config = tiny_config(*overrides, model=model, num_devices=1)
  return Experiment(config, None, devices=jax.devices()[:1])


def train(exp, steps=3):
  """(initial, final) variables, flat, after ``steps`` train steps."""
  state = exp.init_state()
  before = files.flatten(jax.device_get({"params": state.params, **state.model_state}))
  iterator = exp.pipeline.train_iterator()
  for _ in range(steps):
    state, _ = exp.train_step(state, parallel.global_batch(next(iterator), exp.mesh))
  return before, files.flatten(jax.device_get({"params": state.params, **state.model_state}))


def test_frozen_parameters_stay_while_the_others_move():
  exp = experiment("optimizer.freeze=^Dense_0/")
  before, after = train(exp)
  for name in ("params/Dense_0/kernel", "params/Dense_0/bias"):
    assert after[name].tobytes() == before[name].tobytes()
  for name in ("params/Dense_1/kernel", "params/Dense_1/bias"):
    assert not np.allclose(after[name], before[name])
  assert exp.partition.count(exp.init_state().params) == (16 * 10 + 10, 64 * 16 + 16 + 170)


def test_a_learning_rate_multiplier_scales_the_sgd_update():
  sgd = ("optimizer.name=sgd", "optimizer.momentum=0.0", "optimizer.learning_rate=0.5")
  before, plain = train(experiment(*sgd), steps=1)
  _, scaled = train(experiment(*sgd, "optimizer.lr_multipliers=[('^Dense_1/', 0.1)]"), steps=1)
  for name in before:
    update, reference = scaled[name] - before[name], plain[name] - before[name]
    factor = 0.1 if "Dense_1" in name else 1.0
    np.testing.assert_allclose(update, factor * reference, rtol=1e-5, atol=1e-8)
    assert np.any(reference)


def test_batch_statistics_can_be_frozen():
  model = dict(name="encoder_cnn", widths=(4, 8))
  before, moving = train(experiment(model=model), steps=1)
  _, frozen = train(experiment("optimizer.freeze_batch_stats=True", model=model), steps=1)
  stats = [k for k in before if k.startswith("batch_stats/")]
  assert stats
  for name in stats:
    assert frozen[name].tobytes() == before[name].tobytes()
    assert not np.array_equal(moving[name], before[name])
  assert not np.array_equal(frozen["params/head/kernel"], before["params/head/kernel"])


@pytest.mark.parametrize("override, message", [
    ("optimizer.freeze=^nothing/", "optimizer.freeze '^nothing/' matches no parameter"),
    ("optimizer.freeze=Dense", "every parameter is frozen"),
    ("optimizer.freeze=(", "optimizer.freeze '(' is not a regex"),
    ("optimizer.lr_multipliers=[('x', -1.0)]", "(regex, factor >= 0)"),
])
def test_bad_partitions_are_one_line(override, message):
  with pytest.raises(ConfigError) as error:
    experiment(override)
  assert message in str(error.value) and "\n" not in str(error.value)
