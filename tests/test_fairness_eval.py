"""Group fairness in eval (bundled:fair has a group), reweighing, and the fairness experiment."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import deepflow
from deepflow.analysis.fairness import group_metrics, reweighing_weights
from deepflow.data.pipeline import INPUTS, MASK, TARGETS, Pipeline
from deepflow.registry import ConfigError, TASKS
from deepflow.tasks.supervised import GROUP, reweighing_table
from deepflow.train import checkpoint as checkpoint_lib
from deepflow.train.experiment import Experiment
from tests.helpers import experiment, tiny, tiny_config


def fair_config(data_dir, *overrides, source="bundled:fair"):
  return tiny_config(*overrides, model=dict(name="mlp", hidden=(16,)), data__source=source,
                     data__data_dir=data_dir, data__batch_size=64, data__eval_batch_size=256,
                     train__steps=20, train__log_every=10)


def test_eval_reports_group_metrics_of_the_models_predictions(data_dir, tmp_path):
  config = fair_config(data_dir)
  metrics = deepflow.train_and_evaluate(config, str(tmp_path))
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), read_only=True)
  exp = Experiment(config, str(tmp_path))
  state, _, _ = exp.restore(checkpointer)
  checkpointer.close()

  # By hand: the model's argmax on every real test row, then the metrics library.
  predictions, labels, groups = [], [], []
  for batch in exp.pipeline.eval_batches("test"):
    logits = exp.task.model.apply({"params": state.params}, batch[INPUTS])
    real = batch[MASK] > 0
    predictions.append(np.argmax(logits, -1)[real])
    labels.append(batch[TARGETS][real])
    groups.append(batch[GROUP][real])
  expected = group_metrics(np.concatenate(predictions), np.concatenate(labels),
                           np.concatenate(groups))
  assert len(np.concatenate(labels)) == 1274
  assert expected["fairness/group_1/count"] > 0 and expected["fairness/group_0/count"] > 0
  for key, value in expected.items():
    assert metrics[key] == pytest.approx(value, nan_ok=True), key
  assert metrics["fairness/accuracy"] == pytest.approx(metrics["accuracy"])


def test_fairness_option(data_dir):
  def eval_keys(*overrides, source="bundled:fair"):
    config = fair_config(data_dir, *overrides, source=source)
    pipeline = Pipeline(config)
    task = TASKS.get("classification")(config, pipeline.spec)
    params, state = task.init(jax.random.PRNGKey(0))
    return set(task.eval_outputs(params, state, next(pipeline.eval_batches("test"))))

  assert {"prediction", GROUP} <= eval_keys()
  assert not {"prediction", GROUP} & eval_keys("task.fairness=False")
  assert not {"prediction", GROUP} & eval_keys(source="bundled:breast_cancer")  # no group: none
  with pytest.raises(ConfigError, match="needs a dataset whose examples carry a 'group'"):
    eval_keys("task.fairness=True", source="bundled:breast_cancer")
  with pytest.raises(ConfigError, match="needs a binary classification"):
    eval_keys("task.fairness=True", source="bundled:digits")
  with pytest.raises(ConfigError, match="task.fairness must be"):
    eval_keys("task.fairness='yes'")


def test_fairness_without_a_group_fails_before_training(data_dir, tmp_path):
  config = fair_config(data_dir, "task.fairness=True", source="bundled:breast_cancer")
  with pytest.raises(ConfigError, match="task.fairness needs a dataset"):
    deepflow.train_and_evaluate(config, str(tmp_path))
  # Refused when the steps are first compiled (the fit check), before any checkpoint is written.
  checkpoints = tmp_path / "checkpoints"
  assert not checkpoints.exists() or not os.listdir(checkpoints)
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_group_weights_weigh_each_example_by_its_group_and_label(data_dir):
  table = [[0.5, 2.0], [1.5, 0.25]]
  config = fair_config(data_dir, f"task.group_weights={table}")
  pipeline = Pipeline(config)
  task = TASKS.get("classification")(config, pipeline.spec)
  params, state = task.init(jax.random.PRNGKey(0))
  batch = next(pipeline.train_iterator())
  loss, _ = task.loss(params, state, batch, None)
  logits = task.model.apply({"params": params}, batch[INPUTS])
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch[TARGETS])
  weights = np.asarray(table)[batch[GROUP], batch[TARGETS]]
  assert len(set(weights.tolist())) == 4  # every cell occurs: the check is not vacuous
  assert float(loss) == pytest.approx(float(jnp.mean(per_example * weights)), rel=1e-5)

  for bad in ("[[1.0, 2.0], [1.0]]", "[1.0, 2.0]", "[[1.0, -2.0]]"):
    with pytest.raises(ConfigError, match="task.group_weights must be"):
      TASKS.get("classification")(fair_config(data_dir, f"task.group_weights={bad}"),
                                  pipeline.spec)


def test_reweighing_table_holds_the_per_example_weights():
  rng = np.random.default_rng(0)
  groups = rng.integers(0, 3, 500)
  labels = (rng.random(500) < 0.2 + 0.2 * groups).astype(int)
  table = np.asarray(reweighing_table(labels, groups, 2))
  np.testing.assert_allclose(table[groups, labels], reweighing_weights(labels, groups))
  # Weighted, the label rate is the same in every group.
  w = table[groups, labels]
  rates = [np.sum(w * labels * (groups == g)) / np.sum(w * (groups == g)) for g in range(3)]
  np.testing.assert_allclose(rates, labels.mean())


def test_fairness_experiment_runs(data_dir, tmp_path):
  _, module = experiment("fairness_affairs")
  results = module.main(["--workdir", str(tmp_path), "--seeds", "1", *tiny(data_dir)])
  assert set(results) == {"unweighted/seed0", "reweighed/seed0"}
  for metrics in results.values():
    assert set(module.KEYS) <= set(metrics["test"])
