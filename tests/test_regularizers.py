"""Every regularizer against its formula, the task-side pieces (soft targets, class weights,
binary metrics) against theirs, and early stopping end to end (stops, keeps and returns the best,
stays stopped on a rerun)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn import metrics as skm

import deepflow
from deepflow import regularizers as reg
from deepflow.config import base_config, finalize
from deepflow.data.pipeline import INPUTS, TARGETS, DataSpec
from deepflow.registry import ConfigError
from deepflow.tasks.supervised import Classification, binary_metrics
from deepflow.train import early_stopping
from deepflow.train.writers import read_metrics
from tests.helpers import grads_of, tiny_config
from tests.numerics import assert_same_math

PARAMS = {"dense": {"kernel": jnp.array([[1.0, -2.0], [3.0, 0.5]]), "bias": jnp.array([4.0, 5.0])},
          "head": {"kernel": jnp.array([[-1.0], [2.0]]), "bias": jnp.array([7.0])}}


def build(*entries):
  return reg.build_regularizers([dict(e) for e in entries])


def test_l2_and_l1_penalties_sum_over_matched_parameters_only():
  kernels = [PARAMS["dense"]["kernel"], PARAMS["head"]["kernel"]]
  l2 = build(dict(name="l2", amount=0.01)).penalty(PARAMS)
  np.testing.assert_allclose(l2, 0.01 * sum(float(jnp.sum(k ** 2)) for k in kernels), rtol=1e-6)
  l1 = build(dict(name="l1", amount=0.1, params=r"^head/")).penalty(PARAMS)
  np.testing.assert_allclose(l1, 0.1 * (1 + 2 + 7), rtol=1e-6)  # head kernel and bias
  both = build(dict(name="l1", amount=0.1), dict(name="l2", amount=0.01)).penalty(PARAMS)
  np.testing.assert_allclose(both, l2 + 0.1 * (1 + 2 + 3 + 0.5 + 1 + 2), rtol=1e-6)


def test_label_smoothing_formula():
  batch = {INPUTS: jnp.zeros((3, 2)), TARGETS: jnp.array([0, 2, 1])}
  out = build(dict(name="label_smoothing", amount=0.3)).batch(batch, jax.random.key(0), 3)
  expected = 0.7 * np.eye(3)[[0, 2, 1]] + 0.3 / 3
  np.testing.assert_allclose(out[TARGETS], expected, rtol=1e-6)


def test_mixup_is_one_convex_combination_with_a_permutation():
  x = jnp.arange(8 * 3, dtype=jnp.float32).reshape(8, 3) ** 1.5
  labels = jnp.arange(8) % 4
  out = build(dict(name="mixup", alpha=0.4)).batch({INPUTS: x, TARGETS: labels},
                                                   jax.random.key(3), 4)
  rng = jax.random.fold_in(jax.random.key(3), 0)  # combine() gives part i the key fold_in(rng, i)
  ratio_rng, perm_rng = jax.random.split(rng)
  lam = jax.random.beta(ratio_rng, 0.4, 0.4)
  perm = jax.random.permutation(perm_rng, 8)
  assert sorted(np.asarray(perm).tolist()) == list(range(8))
  np.testing.assert_allclose(out[INPUTS], lam * x + (1 - lam) * x[perm], rtol=1e-6)
  onehot = jax.nn.one_hot(labels, 4)
  np.testing.assert_allclose(out[TARGETS], lam * onehot + (1 - lam) * onehot[perm], rtol=1e-6)
  np.testing.assert_allclose(out[TARGETS].sum(-1), 1.0, rtol=1e-6)


def test_cutmix_pastes_one_box_and_mixes_targets_by_its_area():
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 1))
  labels = jnp.arange(16) % 10
  out = build(dict(name="cutmix", alpha=1.0)).batch({INPUTS: x, TARGETS: labels},
                                                    jax.random.key(5), 10)
  rng = jax.random.fold_in(jax.random.key(5), 0)
  perm = jax.random.permutation(jax.random.split(rng, 4)[1], 16)
  pasted = np.asarray(out[INPUTS] == x[perm])[..., 0] & np.asarray(out[INPUTS] != x)[..., 0]
  from_self = np.asarray(out[INPUTS] == x)[..., 0]
  assert (pasted | from_self).all()
  box = pasted.any(0)  # the same box for every example
  rows, cols = np.nonzero(box)
  assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # a rectangle
  kept = 1 - box.sum() / 64
  onehot = np.eye(10)[labels]
  np.testing.assert_allclose(out[TARGETS], kept * onehot + (1 - kept) * onehot[perm], atol=1e-6)


def test_gradient_noise_variance_follows_the_schedule():
  tx = build(dict(name="gradient_noise", eta=0.3, gamma=0.55, seed=1)).gradient
  zeros = {"w": jnp.zeros((200_000,))}
  state = tx.init(zeros)
  for t in (1, 2, 3):
    noise, state = tx.update(zeros, state)
    np.testing.assert_allclose(np.var(noise["w"]), 0.3 / t ** 0.55, rtol=0.02)


def test_max_norm_rescales_long_columns_only():
  limit = 2.0
  params = {"dense": {"kernel": jnp.array([[3.0, 0.5], [4.0, 0.5]]), "bias": jnp.array([9.0, 9.0])}}
  updates = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
  tx = build(dict(name="max_norm", limit=limit)).projection
  out, _ = tx.update(updates, tx.init(params), params)
  new = optax.apply_updates(params, out)
  raw = np.asarray(params["dense"]["kernel"] + 0.1)
  np.testing.assert_allclose(new["dense"]["kernel"][:, 0], raw[:, 0] * limit /
                             np.linalg.norm(raw[:, 0]), rtol=1e-6)
  np.testing.assert_allclose(new["dense"]["kernel"][:, 1], raw[:, 1], rtol=1e-6)
  np.testing.assert_allclose(new["dense"]["bias"], 9.1, rtol=1e-6)  # not a kernel


def test_weight_decay_is_decoupled_and_masked_by_regex():
  from deepflow.optim import build_optimizer
  config = base_config()
  config.optimizer.update(name="sgd", momentum=0.0, learning_rate=0.1, weight_decay=0.01)
  tx = build_optimizer(finalize(config).optimizer, 10)
  grads = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  np.testing.assert_allclose(updates["dense"]["kernel"],
                             -0.1 * (0.5 + 0.01 * PARAMS["dense"]["kernel"]), rtol=1e-6)
  np.testing.assert_allclose(updates["dense"]["bias"], -0.1 * 0.5, rtol=1e-6)  # not matched
  # adamw: the decay is added to Adam's normalized direction, not to the gradient.
  config.optimizer.update(name="adamw", weight_decay_mask=r"^head/")
  tx = build_optimizer(finalize(config).optimizer, 10)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  direction = 1.0 / (1.0 + 1e-8 / 0.5)  # first Adam step: g / (|g| + eps)
  np.testing.assert_allclose(updates["head"]["bias"], -0.1 * (direction + 0.01 * 7.0), rtol=1e-5)
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * direction, rtol=1e-5)


def test_bad_entries_are_one_line_config_errors():
  with pytest.raises(ConfigError, match="unknown regularizer 'mixpu'.*did you mean 'mixup'"):
    build(dict(name="mixpu"))
  with pytest.raises(ConfigError, match="regularizer 'l2'.*amount"):
    build(dict(name="l2", amount=-1.0))
  with pytest.raises(ConfigError, match="regularizer 'mixup'.*unexpected keyword"):
    build(dict(name="mixup", beta=1.0))
  with pytest.raises(ConfigError, match="mode"):
    build(dict(name="early_stopping", mode="up"))


def test_stopping_record_counts_patience():
  rule = early_stopping.EarlyStopping(metric="accuracy", mode="max", patience=2, min_delta=0.01)
  record = early_stopping.StoppingRecord()
  seen = [record.update(rule, s, {"accuracy": a}) for s, a in
          [(10, 0.5), (20, 0.6), (30, 0.605), (20, 0.9), (40, 0.55)]]
  assert seen == [True, True, False, False, False]  # +0.005 < min_delta; step 20 again ignored
  assert (record.best, record.best_step, record.stopped) == (0.6, 20, True)
  with pytest.raises(ConfigError, match="not an eval metric"):
    early_stopping.StoppingRecord().update(rule, 1, {"loss": 1.0})


# ------------------------------------------------------------------------------------------------
# Task side: soft targets, penalties in the gradients, class weights, binary metrics.
# ------------------------------------------------------------------------------------------------

def make_task(regularizers=(), class_weights=None, counts=(30, 10)):
  config = tiny_config(model=dict(name="mlp", hidden=(4,)),
                       regularizers=[dict(r) for r in regularizers],
                       task__class_weights=class_weights)
  spec = DataSpec(input_shape=(3,), input_dtype=jnp.float32, target_shape=(), num_classes=2,
                  train_size=sum(counts), metadata={}, class_counts=tuple(counts))
  return Classification(config, spec)


BATCH = {INPUTS: jnp.array([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5], [0.1, 0.2, 0.3]]),
         TARGETS: jnp.array([0, 1, 1])}


def test_l2_penalty_enters_the_gradient_as_2_amount_w():
  plain, with_l2 = make_task(), make_task([dict(name="l2", amount=0.05)])
  params, state = plain.init(jax.random.key(0))
  g0, _, m0 = grads_of(plain)(params, state, BATCH, jax.random.key(1))
  g1, _, m1 = grads_of(with_l2)(params, state, BATCH, jax.random.key(1))
  expected = jax.tree_util.tree_map_with_path(
      lambda path, g, p: g + (0.1 * p if path[-1].key == "kernel" else 0), g0, params)
  jax.tree.map(assert_same_math, g1, expected)
  np.testing.assert_allclose(m1["loss"] - m0["loss"], m1["penalty"], rtol=1e-5)


def test_soft_target_loss_is_cross_entropy_with_smoothed_labels():
  task = make_task([dict(name="label_smoothing", amount=0.2)])
  params, state = task.init(jax.random.key(0))
  _, _, m = grads_of(task)(params, state, BATCH, jax.random.key(1))
  logits = task.model.apply({"params": params}, BATCH[INPUTS])
  targets = 0.8 * jax.nn.one_hot(BATCH[TARGETS], 2) + 0.1
  expected = -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), -1))
  np.testing.assert_allclose(m["loss"], expected, rtol=1e-5)


def test_balanced_class_weights():
  task = make_task(class_weights="balanced", counts=(30, 10))
  np.testing.assert_allclose(task.class_weights, [40 / (2 * 30), 40 / (2 * 10)], rtol=1e-6)
  params, state = task.init(jax.random.key(0))
  loss, _ = task.loss(params, state, BATCH, None)
  logits = task.model.apply({"params": params}, BATCH[INPUTS])
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, BATCH[TARGETS])
  np.testing.assert_allclose(loss, jnp.mean(per_example * task.class_weights[BATCH[TARGETS]]),
                             rtol=1e-6)
  assert make_task(class_weights=[1, 3]).class_weights.tolist() == [1.0, 3.0]
  with pytest.raises(ConfigError, match="class_weights"):
    make_task(class_weights=[1, 2, 3])


def test_binary_metrics_match_their_definitions():
  labels = np.array([1, 1, 1, 0, 0, 0, 0, 1])
  prob = np.array([0.9, 0.6, 0.3, 0.7, 0.2, 0.1, 0.4, 0.8])
  m = binary_metrics(labels, prob)
  tp, fp, fn = 3, 1, 1  # predicted positive: 0.9, 0.6, 0.7, 0.8
  assert m["precision"] == pytest.approx(tp / (tp + fp))
  assert m["recall"] == pytest.approx(tp / (tp + fn))
  assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
  # AUC: the fraction of (positive, negative) pairs ranked correctly.
  pairs = [(p, n) for p in prob[labels == 1] for n in prob[labels == 0]]
  assert m["auc"] == pytest.approx(np.mean([p > n for p, n in pairs]))
  assert m["auc"] == pytest.approx(skm.roc_auc_score(labels, prob))
  assert np.isnan(binary_metrics(np.zeros(3), np.array([0.1, 0.6, 0.2]))["auc"])


# ------------------------------------------------------------------------------------------------
# Early stopping, end to end.
# ------------------------------------------------------------------------------------------------

def test_early_stopping_stops_and_returns_the_best_checkpoint(tmp_path):
  # Accuracy on this easy set soon reaches its ceiling: then it stops improving.
  config = tiny_config(data__batch_size=64, train__steps=400, train__eval_every=10,
                       regularizers=[dict(name="early_stopping", metric="accuracy", mode="max",
                                          patience=2)])
  workdir = str(tmp_path / "run")
  final = deepflow.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "best", "stopping.json")) as f:
    record = json.load(f)
  evals = [r for r in read_metrics(workdir) if r["split"] == "test"]
  assert record["stopped"] and record["last_step"] < 400
  assert record["last_step"] - record["best_step"] == 2 * 10  # patience evaluations
  best = min(evals, key=lambda r: (-r["accuracy"], r["step"]))  # the first of the best
  assert best["step"] == record["best_step"] < record["last_step"]
  assert final == pytest.approx({k: best[k] for k in final}, rel=1e-5)
  lines = len(read_metrics(workdir))
  again = deepflow.train_and_evaluate(config, workdir)  # a rerun trains no further
  assert again["loss"] == pytest.approx(final["loss"], rel=1e-5)
  assert max(r["step"] for r in read_metrics(workdir)) == record["last_step"]
  assert len(read_metrics(workdir)) == lines + 1


def test_device_crop_takes_a_window_of_the_zero_padded_image_per_example():
  x = jax.random.normal(jax.random.key(0), (16, 6, 5, 2))
  out = jax.jit(lambda b, r: build(dict(name="device_crop", padding=2)).batch(b, r, 10))(
      {INPUTS: x, TARGETS: jnp.zeros(16, jnp.int32)}, jax.random.key(1))[INPUTS]
  padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
  offsets = set()
  for i in range(16):
    found = [(dy, dx) for dy in range(5) for dx in range(5)
             if np.array_equal(padded[i, dy:dy + 6, dx:dx + 5], np.asarray(out[i]))]
    assert found, f"example {i} is no window of its padded image"
    offsets.add(found[0])
  assert len(offsets) > 4  # offsets differ between examples


def test_device_flip_mirrors_about_half_the_images():
  x = jax.random.normal(jax.random.key(0), (200, 4, 5, 1))
  out = build(dict(name="device_flip")).batch({INPUTS: x, TARGETS: jnp.zeros(200)},
                                              jax.random.key(2), 10)[INPUTS]
  mirrored = np.array([np.array_equal(o, np.asarray(v)[:, ::-1]) for o, v in zip(out, x)])
  same = np.array([np.array_equal(o, v) for o, v in zip(out, x)])
  assert np.all(mirrored | same) and 70 < mirrored.sum() < 130
  with pytest.raises(ConfigError, match="needs \\(B, H, W, C\\) images"):
    build(dict(name="device_flip")).batch({INPUTS: x[:, 0], TARGETS: jnp.zeros(200)},
                                          jax.random.key(2), 10)
