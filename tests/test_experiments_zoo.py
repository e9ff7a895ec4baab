"""The model-zoo experiments: each runs a few steps with tiny overrides (the IMDB one on TFDS
mock data), and batch-norm statistics agree on one and eight devices through the real step."""
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh

import deepflow
from deepflow import parallel
from deepflow.data.pipeline import Pipeline
from deepflow.registry import TASKS
from deepflow.train.state import create_state
from deepflow.train.step import compile_steps
from tests.helpers import reference_accuracy, update_of

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, "experiments")


def path(name):
  return os.path.join(ROOT, f"{name}.py")


def tiny(data_dir, steps=2):
  return [f"train.steps={steps}", "train.log_every=1", "train.eval_every=0",
          "train.checkpoint_every=0", "train.progress=False", f"data.data_dir='{data_dir}'"]


# Smaller models and eval splits where they cost the most time: the files' own configs are what
# load_config validates; a few steps of a smaller model show that the rest of them runs.
@pytest.mark.parametrize("name, metric, smaller", [
    ("digits_resnet", "accuracy", ["model.stage_sizes=(1, 1)"]),
    ("digits_vit", "accuracy", ["model.num_layers=1"]),
    ("co2_lstm", "rmse_ratio", []),
    ("co2_transformer", "rmse_ratio", ["model.num_layers=1"]),
    ("sunspots_lstm", "rmse_ratio", []),
    ("text_lstm", "perplexity", ["model.hidden_size=32", "data.eval_split=validation"]),
    ("text_transformer", "perplexity", ["model.num_layers=1", "data.eval_split=validation"]),
])
def test_experiment_runs(name, metric, smaller, data_dir, tmp_path):
  deepflow.load_config(path(name))  # the file as written validates
  config = deepflow.load_config(path(name), [*tiny(data_dir), *smaller])
  metrics = deepflow.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(metrics[metric])
  with open(path(name)) as f:
    doc = f.read().split('"""')[1]
  assert f"--config experiments/{name}.py" in doc and "Measured" in doc


def test_imdb_sentiment_on_mock_data(tmp_path, monkeypatch):
  """``tfds:imdb_reviews`` as if prepared: mock_data serves random text, which the tokenize
  transform maps to word ids for the transformer encoder."""
  monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
  overrides = [*tiny(tmp_path / "tfds"), "data.batch_size=16", "data.eval_batch_size=32"]
  with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
    config = deepflow.load_config(path("imdb_sentiment"), overrides)
    metrics = deepflow.train_and_evaluate(config, str(tmp_path / "run"))
    pipeline = Pipeline(config, str(tmp_path / "run"))
    # Mock reviews have random labels: no model is above chance, so check against a reference.
    reference = reference_accuracy(str(tmp_path / "run"))
  assert metrics["accuracy"] == pytest.approx(reference, abs=1e-6) and "auc" in metrics
  assert pipeline.spec.input_shape == (256,) and pipeline.spec.input_dtype == np.int32
  vocab = pipeline.stats[0]["vocab"]
  assert 0 < len(vocab) <= 20000 - 2  # fitted on the train split, saved in the workdir


def test_batch_norm_statistics_equal_on_one_and_eight_devices(data_dir):
  """The ResNet experiment through the jitted, sharded train step: with the batch split over
  eight devices, batch norm still normalizes by (and records) the global batch's statistics."""
  config = deepflow.load_config(path("digits_resnet"), [
      *tiny(data_dir), "model.stage_sizes=(1, 1)", "model.width=8", "data.batch_size=32"])
  pipeline = Pipeline(config)
  task = TASKS.get(config.task.name)(config, pipeline.spec)
  update = update_of(task)
  tx = update.tx
  it = pipeline.train_iterator()
  batches = [next(it) for _ in range(3)]

  def run(devices):
    mesh = Mesh(np.asarray(devices).reshape(len(devices), 1), ("data", "model"))
    state = create_state(update, tx, seed=0)
    shardings = parallel.state_shardings(state, mesh, config.parallel)
    train_step, _ = compile_steps(update, mesh, shardings)
    state = jax.device_put(state, shardings)
    for batch in batches:
      state, _ = train_step(state, parallel.global_batch(batch, mesh))
    return jax.device_get(state)

  one, eight = run(jax.devices()[:1]), run(jax.devices())
  assert len(jax.devices()) == 8
  stats = jax.tree_util.tree_leaves_with_path(one.model_state["batch_stats"])
  assert len(stats) == 2 * 6  # mean and var of the stem's and the five blocks' batch norms
  initial = create_state(update, tx, seed=0).model_state["batch_stats"]
  for (key, a), b, start in zip(stats, jax.tree.leaves(eight.model_state["batch_stats"]),
                                jax.tree.leaves(initial)):
    assert not np.allclose(a, start), key  # they moved ...
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=str(key))  # ... alike
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
