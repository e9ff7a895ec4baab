"""The loop: resumption is exact, a finished run is not retrained, bad checkpoints and
non-finite losses are refused without losing what was saved."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

import deepflow
from deepflow.train import NonFiniteLossError
from deepflow.train.checkpoint import CheckpointMismatchError, Checkpointer
from deepflow.train.experiment import Experiment
from tests.helpers import tiny_config


def final_params(config, workdir, step=None):
  exp = Experiment(config, workdir)
  checkpointer = Checkpointer(workdir, read_only=True)
  try:
    state, data_state, restored = exp.restore(checkpointer, step)
  finally:
    checkpointer.close()
  return jax.device_get(state.params), data_state, restored


def test_resume_is_bit_identical(tmp_path):
  config = tiny_config("train.steps=12", "train.checkpoint_every=6", "optimizer.schedule=cosine",
                       model=dict(name="mlp", hidden=(32,), dropout=0.3))
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  deepflow.train_and_evaluate(config, a)
  shutil.copytree(a, b)
  shutil.rmtree(os.path.join(b, "checkpoints", "12"))  # as if killed after step 6's save
  deepflow.train_and_evaluate(config, b)
  pa, data_a, _ = final_params(config, a)
  pb, data_b, step = final_params(config, b)
  assert step == 12 and data_a == data_b
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(x, y)


def test_finished_run_is_not_retrained(tmp_path):
  config = tiny_config()
  first = deepflow.train_and_evaluate(config, str(tmp_path))
  lines = open(tmp_path / "metrics.jsonl").read().splitlines()
  again = deepflow.train_and_evaluate(config, str(tmp_path))
  assert first == again
  new = open(tmp_path / "metrics.jsonl").read().splitlines()[len(lines):]
  assert [json.loads(x)["split"] for x in new] == ["test"]  # only the re-evaluation


def test_workdir_contents(tmp_path):
  metrics = deepflow.train_and_evaluate(tiny_config("train.eval_every=4"), str(tmp_path))
  assert set(metrics) == {"loss", "accuracy"}
  records = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  assert all({"step", "split"} <= set(r) for r in records)
  assert [r["step"] for r in records if r["split"] == "test"] == [4, 8]
  assert json.load(open(tmp_path / "config.json"))["train"]["steps"] == 8
  assert os.listdir(tmp_path / "tensorboard")
  assert os.path.exists(tmp_path / "preprocessing.npz")


def test_checkpoint_of_another_model_is_refused(tmp_path):
  deepflow.train_and_evaluate(tiny_config(), str(tmp_path))
  other = tiny_config(model=dict(name="mlp", hidden=(16,)))
  with pytest.raises(CheckpointMismatchError, match="cannot be restored into the configured model"):
    deepflow.train_and_evaluate(other, str(tmp_path))
  final_params(tiny_config(), str(tmp_path))  # still restorable with the right config


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss_stops_with_the_checkpoint_intact(tmp_path, policy):
  config = tiny_config("optimizer.name=sgd", "optimizer.momentum=0.0",
                       "optimizer.learning_rate=1e30", "train.checkpoint_every=1",
                       f"train.nonfinite={policy}", "train.max_nonfinite=2", "train.steps=20")
  with pytest.raises(NonFiniteLossError, match="non-finite") as e:
    deepflow.train_and_evaluate(config, str(tmp_path))
  assert "\n" not in str(e.value)
  params, _, step = final_params(config, str(tmp_path))
  assert step < 20
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
