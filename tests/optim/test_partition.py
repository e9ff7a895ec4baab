"""Freezing and per-group learning rates (deepflow.optim.partition) against references: frozen
parameters and statistics do not move, a multiplier scales plain SGD's update exactly."""
import jax
import numpy as np
import pytest

from deepflow import parallel
from deepflow.registry import ConfigError
from deepflow.train.experiment import Experiment
from deepflow.train.step import gradient_fn
from deepflow.weights import files
from tests.helpers import tiny_config
from tests.numerics import assert_same_math

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
    assert_same_math(update, factor * reference)
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
    # One rule for every selection by regex: a pattern that selects nothing names itself.
    ("optimizer.lr_multipliers=[('^Dense_9/', 0.1)]",
     "optimizer.lr_multipliers '^Dense_9/' matches no parameter; the model's are: "),
    (("optimizer.weight_decay=0.1", "optimizer.weight_decay_mask=bais$"),
     "optimizer.weight_decay_mask 'bais$' matches no parameter"),
    ("regularizers=[{'name':'l2','amount':0.1,'params':'^body/'}]",
     "regularizer 'l2': params '^body/' matches no parameter"),
    ("regularizers=[{'name':'max_norm','params':'^body/'}]",
     "regularizer 'max_norm': params '^body/' matches no parameter"),
    ("parallel.rules=[('^params/body/',())]", "parallel.rules '^params/body/' matches no variable"),
])
def test_bad_partitions_are_one_line(override, message):
  with pytest.raises(ConfigError) as error:
    experiment(*((override,) if isinstance(override, str) else override))
  assert message in str(error.value) and "\n" not in str(error.value)


THREE = dict(name="mlp", hidden=(16, 16))  # Dense_0 (64 -> 16), Dense_1 (16 -> 16), Dense_2


def grads_and_program(*overrides):
  """(the train step's gradient of the first batch, its lowered StableHLO text, its compiled
  flops)."""
  exp = experiment(*overrides, model=THREE)
  state = exp.init_state()
  batch = next(exp.pipeline.train_iterator())
  grads = jax.jit(gradient_fn(exp.update))
  args = (state.params, state.model_state, batch, jax.random.key(0))
  lowered = grads.lower(*args)
  return grads(*args), lowered.as_text(), lowered.compile().cost_analysis()["flops"]


def test_frozen_kernels_are_not_differentiated():
  """Freezing the middle layer: the trained layers' gradients are those of differentiating
  everything, the frozen ones are zero, and the frozen kernel's weight gradient (the one
  dot_general giving a 16x16 result) is gone from the program JAX emits: the compiled flops drop
by its 2 B 16 16, plus at most the bias gradient's sum over the batch."""
  (full, _, _), full_text, full_flops = grads_and_program()
  (part, _, metrics), part_text, part_flops = grads_and_program("optimizer.freeze=^Dense_1/")
  for layer in ("Dense_0", "Dense_2"):
    jax.tree.map(assert_same_math, part[layer], full[layer])
  assert not any(np.any(leaf) for leaf in jax.tree.leaves(part["Dense_1"]))
  assert np.any(full["Dense_1"]["kernel"]) and np.isfinite(metrics["loss"])
  dots = lambda text: [line for line in text.splitlines() if "dot_general" in line]  # noqa
  weight_grad = lambda line: line.endswith("-> tensor<16x16xf32>")  # noqa: E731
  assert len(dots(full_text)) - len(dots(part_text)) == 1
  assert sum(map(weight_grad, dots(full_text))) == 1 and not any(map(weight_grad,
                                                                     dots(part_text)))
  assert 2 * 32 * 16 * 16 <= full_flops - part_flops <= 2 * 32 * 16 * 16 + 32 * 16


def test_micro_batches_with_frozen_parameters_equal_the_whole_batch():
  """Accumulating only the trained parameters' gradients over 4 micro-batches gives the update
  of the whole batch at once; the frozen layer stays as it was."""
  before, whole = train(experiment("optimizer.freeze=^Dense_0/"), steps=2)
  _, micro = train(experiment("optimizer.freeze=^Dense_0/", "train.microbatches=4"), steps=2)
  for name in before:
    np.testing.assert_allclose(micro[name], whole[name], rtol=1e-5, atol=1e-6)
    assert (micro[name].tobytes() == before[name].tobytes()) == ("Dense_0" in name), name
