"""The GAN task: one jitted step updates both players (each by the gradient of its own loss, with
its own optimizer), eval scores samples with the reference classifier, sampling writes a PNG."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepflow import sample
from deepflow.analysis import reference as reference_lib
from deepflow.data.pipeline import INPUTS, TARGETS, Pipeline
from deepflow.models import gan as gan_lib
from deepflow.registry import ConfigError, TASKS
from deepflow.tasks import gan
from deepflow.train.state import create_state
from deepflow.train.step import make_train_step
from tests.helpers import grads_of, tiny_config, update_of
from tests.numerics import assert_same_math

TINY_GAN = dict(name="dcgan", latent_dim=8, features=8, num_classes=10, embed_dim=4)


def gan_config(*overrides, model=None, data_dir=""):
  return tiny_config(*overrides, model=model or TINY_GAN,
                     task=dict(name="gan", reference_steps=0), data__data_dir=data_dir,
                     train__steps=4)


def build(*overrides, model=None, data_dir=""):
  config = gan_config(*overrides, model=model, data_dir=data_dir)
  pipeline = Pipeline(config)
  task = TASKS.get("gan")(config, pipeline.spec)
  return task, pipeline


@pytest.fixture(scope="module")
def setup():
  task, pipeline = build()
  update = update_of(task, 4)
  state = create_state(update, update.tx, seed=0)
  return task, pipeline, state, next(pipeline.train_iterator())


def changed(before, after):
  return any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                        jax.tree.leaves(after)))


@pytest.mark.parametrize("frozen", [None, "generator", "discriminator"])
def test_one_step_updates_both_players_unless_one_is_frozen(frozen):
  overrides = [f"task.{frozen}_learning_rate=0"] if frozen else []
  task, pipeline = build(*overrides)
  update = update_of(task, 4)
  state = create_state(update, update.tx, seed=0)
  new, metrics = jax.jit(make_train_step(update))(state, next(pipeline.train_iterator()))
  for player in gan.PLAYERS:
    assert changed(state.params[player], new.params[player]) == (player != frozen), player
    # batch statistics move in a frozen player too: it still ran forward in training mode
    assert changed(state.model_state["batch_stats"][player],
                   new.model_state["batch_stats"][player])
  assert {"loss", "d_loss", "g_loss", "d_real_accuracy", "d_fake_accuracy"} <= set(metrics)
  np.testing.assert_allclose(metrics["loss"], metrics["d_loss"] + metrics["g_loss"], rtol=1e-6)


@pytest.mark.parametrize("kind", gan_lib.LOSSES)
def test_each_player_gets_the_gradient_of_its_own_loss(setup, kind, monkeypatch):
  """Against a reference written with plain ``jax.grad`` per player (the other player's
  parameters held fixed), on the same latents."""
  task, _, state, batch = setup
  monkeypatch.setattr(task, "kind", kind)
  z = jnp.asarray(np.random.default_rng(0).normal(size=(32, 8)), jnp.float32)
  monkeypatch.setattr(task, "latents", lambda rng, num: z)
  real, labels = jnp.asarray(batch[INPUTS]), jnp.asarray(batch[TARGETS]).astype(jnp.int32)
  grads, model_state, metrics = jax.jit(grads_of(task))(state.params, state.model_state, batch,
                                                    jax.random.PRNGKey(1))

  def logits(params):
    variables = {"params": params, **state.model_state}
    fake, _ = task.model.apply(variables, z, labels, train=True, method="generate",
                               mutable=["batch_stats"])
    out, _ = task.model.apply(variables, jnp.concatenate([real, fake]),
                              jnp.concatenate([labels, labels]), train=True,
                              method="discriminate", mutable=["batch_stats"])
    return jnp.split(out, 2)

  def player_loss(player, sub):
    params = {**state.params, player: sub}
    real_logits, fake_logits = logits(params)
    if player == "discriminator":
      return gan_lib.discriminator_loss(real_logits, fake_logits, kind)
    return gan_lib.generator_loss(fake_logits, kind)

  for player in gan.PLAYERS:
    expected = jax.jit(jax.grad(lambda sub, p=player: player_loss(p, sub)))(state.params[player])
    for got, want in zip(jax.tree.leaves(grads[player]), jax.tree.leaves(expected)):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics["d_loss"], jax.jit(player_loss, static_argnums=0)(
      "discriminator", state.params["discriminator"]), rtol=1e-5)
  assert set(model_state["batch_stats"]) == set(gan.PLAYERS)


def test_a_resting_player_and_frozen_layers_are_not_differentiated(setup):
  """Generator at learning rate 0 and the discriminator's first convolution frozen: their
  gradients are zeros, and the rest of the discriminator gets what it gets with nothing frozen
  (the generator still runs: D's loss sees its samples)."""
  task, _, state, batch = setup
  args = (state.params, state.model_state, batch, jax.random.PRNGKey(1))
  full, _, _ = jax.jit(grads_of(task))(*args)
  resting, _ = build("task.generator_learning_rate=0", "optimizer.freeze=^discriminator/Conv_0/")
  part, _, metrics = jax.jit(grads_of(resting))(*args)
  assert jax.tree.structure(part) == jax.tree.structure(full)
  for tree in (part[gan.GENERATOR], part[gan.DISCRIMINATOR]["Conv_0"]):
    assert not any(np.any(leaf) for leaf in jax.tree.leaves(tree))
  for name, grads in part[gan.DISCRIMINATOR].items():
    if name != "Conv_0":
      jax.tree.map(assert_same_math, grads, full[gan.DISCRIMINATOR][name])
  assert np.any(full[gan.GENERATOR]["Dense_0"]["kernel"]) and np.isfinite(metrics["loss"])


def test_players_have_their_own_learning_rates():
  task, _ = build("task.generator_learning_rate=0.5", "task.discriminator_learning_rate=0.25",
                  "optimizer.name='sgd'", "optimizer.momentum=0.0")
  tx = update_of(task, 4).tx
  params = jax.tree.map(jnp.zeros_like, jax.eval_shape(task.init, jax.random.PRNGKey(0))[0])
  ones = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(ones, tx.init(params), params)
  for player, rate in (("generator", 0.5), ("discriminator", 0.25)):
    np.testing.assert_array_equal(np.concatenate(
        [np.ravel(x) for x in jax.tree.leaves(updates[player])]), -rate)


def test_eval_scores_samples_with_a_cached_reference_classifier(data_dir):
  task, pipeline = build("task.reference_steps=60", data_dir=data_dir)
  update = update_of(task, 4)
  state = create_state(update, update.tx, seed=0)
  chunks = [jax.jit(task.eval_outputs)(state.params, state.model_state, b)
            for b in pipeline.eval_batches("test")]
  outputs = {k: np.concatenate([np.asarray(c[k]) for c in chunks])[:512] for k in chunks[0]}
  metrics = task.summarize(outputs)
  # As many fakes as real images are scored: the discriminator's accuracy is the mean of both.
  assert metrics["d_accuracy"] == pytest.approx(
      (metrics["d_real_accuracy"] + metrics["d_fake_accuracy"]) / 2, abs=1e-6)
  assert metrics["real_accuracy"] > 0.9  # the reference learned the (easy) synthetic classes
  assert metrics["sample_accuracy"] < 0.5  # an untrained generator's samples are not digits
  assert metrics["frechet_distance"] > metrics["real_frechet_distance"] >= 0.0
  np.testing.assert_allclose(metrics["loss"], metrics["d_loss"] + metrics["g_loss"])

  # The classifier was cached in the data dir: a fresh process would load the same weights.
  reference = task.reference()
  assert len(list((Path(data_dir) / reference_lib.REFERENCE_DIR).glob("*.msgpack"))) >= 1
  reference_lib.ReferenceClassifier._memo.clear()
  loaded = task.reference()
  assert loaded is not reference
  for a, b in zip(jax.tree.leaves(reference.variables), jax.tree.leaves(loaded.variables)):
    np.testing.assert_array_equal(a, b)
  assert task.summarize(outputs) == metrics


def test_eval_latents_do_not_depend_on_the_batch(setup):
  task, pipeline, state, _ = setup
  batch = next(pipeline.eval_batches("test"))
  half = {k: v[:32] for k, v in batch.items()}
  whole = task.eval_outputs(state.params, state.model_state, batch)
  part = task.eval_outputs(state.params, state.model_state, half)
  np.testing.assert_allclose(whole["d_fake_accuracy"][:32], part["d_fake_accuracy"])
  np.testing.assert_allclose(whole["g_loss"][:32], part["g_loss"], rtol=1e-5)


def test_class_conditional_sampling_and_saved_files(setup, tmp_path):
  task, _, state, _ = setup
  samples = task.sample(state.params, state.model_state, jax.random.PRNGKey(0), 25)
  assert samples["images"].shape == (25, 8, 8, 1)
  np.testing.assert_array_equal(samples["labels"], np.arange(25) % 10)
  threes = task.sample(state.params, state.model_state, jax.random.PRNGKey(0), 4, prompt="3",
                       temperature=0.5)
  np.testing.assert_array_equal(threes["labels"], [3, 3, 3, 3])
  pair = task.sample(state.params, state.model_state, jax.random.PRNGKey(0), 4, prompt="1, 7")
  np.testing.assert_array_equal(pair["labels"], [1, 7, 1, 7])
  cold = task.sample(state.params, state.model_state, jax.random.PRNGKey(0), 2, prompt=4,
                     temperature=0.0)
  np.testing.assert_allclose(cold["images"][0], cold["images"][1], rtol=1e-6)  # z = 0 for both

  files = sample.save_samples(samples, str(tmp_path / "samples"))
  assert [f.rsplit("/", 1)[-1] for f in files] == ["samples.png", "samples.npz"]
  with open(files[0], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  saved = np.load(files[1])
  np.testing.assert_array_equal(saved["images"], samples["images"])
  np.testing.assert_array_equal(saved["labels"], samples["labels"])


def test_sampling_errors_are_one_line(setup):
  task, _, state, _ = setup
  draw = lambda num=2, **o: task.sample(state.params, state.model_state,  # noqa: E731
                                        jax.random.PRNGKey(0), num, **o)
  with pytest.raises(ConfigError, match="no sample option top_k"):
    draw(top_k=3)
  with pytest.raises(ConfigError, match=r"classes in 0\.\.9"):
    draw(prompt="12")
  with pytest.raises(ConfigError, match=r"classes in 0\.\.9"):
    draw(prompt="seven")
  with pytest.raises(ConfigError, match="temperature must be a number >= 0"):
    draw(temperature=-1)
  with pytest.raises(ConfigError, match="positive integer"):
    draw(num=0)


def test_unconditional_gan():
  task, pipeline = build(model={**TINY_GAN, "num_classes": 0})
  update = update_of(task, 4)
  state = create_state(update, update.tx, seed=0)
  samples = task.sample(state.params, state.model_state, jax.random.PRNGKey(0), 5)
  assert set(samples) == {"images"} and samples["images"].shape == (5, 8, 8, 1)
  with pytest.raises(ConfigError, match="class-conditional"):
    task.sample(state.params, state.model_state, jax.random.PRNGKey(0), 5, prompt="3")


@pytest.mark.parametrize("overrides, model, message", [
    (["task.loss='wasserstein'"], None, "task.loss must be one of"),
    ([], {**TINY_GAN, "image_shape": (16, 16, 1)}, r"set model.image_shape=\(8, 8, 1\)"),
    ([], {**TINY_GAN, "num_classes": 4}, "dataset's number of classes"),
    (["task.discriminator_learning_rate=-1.0"], None, "must be None or a number >= 0"),
    (["regularizers=[{'name': 'label_smoothing'}]"], None, "no batch regularizers"),
    (["privacy.enabled=True", "privacy.noise_multiplier=1.0"], None, "support privacy.enabled"),
    ([], dict(name="mlp"), "generator/discriminator model"),
])
def test_config_errors(overrides, model, message):
  with pytest.raises(ConfigError, match=message):  # from the task, or the update around it
    update_of(build(*overrides, model=model)[0])
