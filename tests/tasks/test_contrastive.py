"""The contrastive task: on-device views, NT-Xent going down in training, and linear probes on
the frozen features that separate a trained encoder from a random one."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepflow.data.pipeline import Pipeline
from deepflow.registry import ConfigError, TASKS
from deepflow.tasks import contrastive
from deepflow.train.experiment import Experiment
from deepflow.train.state import create_state
from deepflow.train.step import make_train_step
from tests.helpers import subprocess_environment, tiny_config, update_of

TINY_ENCODER = dict(name="contrastive_cnn", widths=(8, 16), projection_hidden=16,
                    projection_dim=8)


def contrastive_config(*overrides, source="synthetic:digits_like", data_dir="", model=None):
  return tiny_config(*overrides, model=model or TINY_ENCODER, task__name="contrastive",
                     data__source=source, data__data_dir=data_dir, data__batch_size=64,
                     data__eval_batch_size=120, optimizer__learning_rate=3e-3, train__steps=4)


def images(n=6, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 8, 8, 1)), jnp.float32)


def test_views_are_random_per_example_and_per_key():
  x = images()
  plain = contrastive.random_views(x, jax.random.PRNGKey(0), shift=0.0, rotation=0.0, scale=0.0,
                                   noise=0.0)
  np.testing.assert_allclose(plain, x, atol=1e-6)  # no augmentation: the images themselves
  a = contrastive.random_views(x, jax.random.PRNGKey(0))
  b = contrastive.random_views(x, jax.random.PRNGKey(1))
  assert a.shape == x.shape and not np.allclose(a, b)
  np.testing.assert_array_equal(a, contrastive.random_views(x, jax.random.PRNGKey(0)))
  # the same image in every row still gets a different view in each row
  same = contrastive.random_views(jnp.broadcast_to(x[:1], x.shape), jax.random.PRNGKey(0),
                                  noise=0.0)
  assert not np.allclose(same[0], same[1])


def test_edges_are_extended_not_filled():
  """A constant image stays constant under any map: no fill value leaks in at the borders."""
  flat = contrastive.random_views(jnp.full((2, 8, 8, 1), 3.0), jax.random.PRNGKey(2), shift=2.0,
                                  rotation=30.0, scale=0.3, noise=0.0)
  np.testing.assert_allclose(flat, 3.0, rtol=1e-6)


def test_training_lowers_nt_xent():
  config = contrastive_config()
  pipeline = Pipeline(config)
  task = TASKS.get("contrastive")(config, pipeline.spec)
  update = update_of(task, 30)
  state = create_state(update, update.tx, seed=0)
  batch = next(pipeline.train_iterator())
  key = jax.random.PRNGKey(7)
  loss = jax.jit(lambda s: task.loss(s.params, s.model_state, batch, key)[0])
  before = float(loss(state))
  step = jax.jit(make_train_step(update))
  for _ in range(30):
    state, metrics = step(state, batch)
  assert float(loss(state)) < before - 0.3
  # A view's partner among the 2B - 1 = 127 others: chance 0.008; measured 0.055.
  assert float(metrics["view_accuracy"]) > 0.025


def probe_gain(data_dir: str, workdir: str) -> dict:
  """Probe accuracies of a random and of a 150-step trained encoder on digits: the
  cross-validated probe in eval, and a train -> test probe."""
  config = contrastive_config("train.steps=150", "data.batch_size=128", source="bundled:digits",
                              data_dir=data_dir)
  exp = Experiment(config, workdir)

  def probes(state):
    features = {split: contrastive.split_features(exp.task, state.params, state.model_state,
                                                  exp.pipeline.eval_batches(split))
                for split in ("train", "test")}
    assert features["train"][0].shape == (1437, 16) and features["test"][0].shape == (360, 16)
    return (exp.evaluate(state, "test")["probe_accuracy"],
            contrastive.linear_probe(*features["train"], *features["test"]))

  state = exp.init_state()
  random = probes(state)  # before training: the train step donates the state
  iterator = exp.pipeline.train_iterator()
  for _ in range(config.train.steps):
    state, _ = exp.train_step(state, next(iterator))
  return {"random": random, "trained": probes(state)}


def test_probe_of_a_trained_encoder_beats_a_random_one(data_dir, tmp_path):
  """Run on one device in a subprocess: the probe loop dispatches its 150 steps without reading
  a result, which on several simulated CPU devices can wedge XLA's collectives (the unbounded
  run-ahead of docs/design.md); the contrastive step itself is covered on 8 devices above."""
  script = ("import json, sys; from tests.tasks.test_contrastive import probe_gain; "
            "print(json.dumps(probe_gain(sys.argv[1], sys.argv[2])))")
  env = subprocess_environment(devices=1)
  out = subprocess.run([sys.executable, "-c", script, data_dir, str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  random, trained = result["random"], result["trained"]
  assert trained[0] > random[0] + 0.03  # cross-validated within the test split
  assert trained[1] > random[1]         # fitted on train, scored on test


def test_cross_validated_probe():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), 20)
  separable = np.eye(3)[labels] * 5 + 0.1 * rng.normal(size=(60, 3))
  assert contrastive.linear_probe_cv(separable, labels) == 1.0
  assert contrastive.linear_probe_cv(rng.normal(size=(60, 3)), labels) < 0.7
  assert np.isnan(contrastive.linear_probe_cv(separable, np.zeros(60, int)))
  assert contrastive.linear_probe(separable, labels, separable[:5], labels[:5]) == 1.0


@pytest.mark.parametrize("overrides, source, message", [
    (["task.temperature=0.0"], "synthetic:digits_like", "task.temperature must be a number > 0"),
    (["task.probe_folds=1"], "synthetic:digits_like", "probe_folds must be an integer >= 2"),
    (["regularizers=[{'name': 'mixup'}]"], "synthetic:digits_like", "no batch regularizers"),
    (["privacy.enabled=True", "privacy.noise_multiplier=1.0"], "synthetic:digits_like",
     "support privacy.enabled"),
    ([], "synthetic:regression", "augments \\(H, W, C\\) images"),
])
def test_config_errors(overrides, source, message):
  with pytest.raises(ConfigError, match=message):  # from the task, or the update around it
    config = contrastive_config(*overrides, source=source)
    update_of(TASKS.get("contrastive")(config, Pipeline(config).spec))


def test_a_model_without_features_is_refused():
  config = contrastive_config(model=dict(name="mlp", hidden=(8,)))
  with pytest.raises(ConfigError, match="'features' method"):
    TASKS.get("contrastive")(config, Pipeline(config).spec)
