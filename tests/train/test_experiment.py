"""One way to reopen a run: ``Experiment.from_workdir`` picks the checkpoint every reading command
(eval, explain, sample, export) names with ``--checkpoint best|latest|STEP``."""
import json
import os

import jax
import numpy as np
import pytest

import deepflow
from deepflow.registry import ConfigError
from deepflow.train.checkpoint import Checkpointer
from deepflow.train.experiment import Experiment, RunSource, parse_checkpoint
from tests.helpers import deepflow_cli, one_line_error, tiny_config


def direct(workdir, step, under=""):
  """The state of ``step`` in ``workdir/under/checkpoints``, restored by hand (the reference)."""
  with open(os.path.join(workdir, "config.json")) as f:
    config = deepflow.config.config_from_json(f.read())
  checkpointer = Checkpointer(os.path.join(workdir, under), read_only=True)
  try:
    state, _, restored = Experiment(config, workdir).restore(checkpointer, step)
  finally:
    checkpointer.close()
  assert restored == step
  return jax.device_get(state.params)


def same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
  """A run that early stopping ended after its best evaluation: best != latest."""
  workdir = str(tmp_path_factory.mktemp("stopped"))
  config = tiny_config("train.steps=400", "train.eval_every=10", "train.checkpoint_every=10",
                       "data.batch_size=64")
  config.regularizers = [dict(name="early_stopping", metric="accuracy", mode="max", patience=2)]
  deepflow.train_and_evaluate(deepflow.config.finalize(config), workdir)
  with open(os.path.join(workdir, "best", "stopping.json")) as f:
    record = json.load(f)
  assert record["stopped"] and record["best_step"] < record["last_step"]
  return workdir, record


def test_best_latest_and_a_step(stopped_run):
  workdir, record = stopped_run
  best = Experiment.from_workdir(workdir)  # the default: the run's result
  assert (best.step, best.checkpoint) == (record["best_step"], "best")
  same(jax.device_get(best.state.params), direct(workdir, record["best_step"], "best"))

  latest = Experiment.from_workdir(workdir, checkpoint="latest")
  assert (latest.step, latest.checkpoint) == (record["last_step"], "latest")
  same(jax.device_get(latest.state.params), direct(workdir, record["last_step"]))

  kept = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  exp, state, step, which = Experiment.from_workdir(workdir, checkpoint=str(kept[0]))
  assert (step, which) == (kept[0], "step")
  same(jax.device_get(state.params), direct(workdir, kept[0]))
  with pytest.raises(FileNotFoundError, match=f"no checkpoint of step 1 in .*kept: "
                                              f"{', '.join(map(str, kept))}"):
    Experiment.from_workdir(workdir, checkpoint=1)


def test_without_early_stopping_best_is_the_latest(tmp_path):
  workdir = str(tmp_path / "run")
  deepflow.train_and_evaluate(tiny_config("train.steps=4"), workdir)
  restored = Experiment.from_workdir(workdir)
  assert (restored.step, restored.checkpoint) == (4, "latest")


def test_every_reading_command_takes_the_same_flag(stopped_run, tmp_path):
  workdir, record = stopped_run
  for checkpoint, step in (("best", record["best_step"]), ("latest", record["last_step"])):
    out = deepflow_cli("eval", "--workdir", workdir, "--checkpoint", checkpoint)
    assert out.returncode == 0, out.stderr
    assert f"final test metrics at step {step}:" in out.stdout
  message = one_line_error(deepflow_cli("explain", "--workdir", workdir, "--checkpoint", "first"))
  assert "--checkpoint must be best, latest or a step number, got 'first'" in message


def test_functions_reading_a_run_take_a_run_source(stopped_run, tmp_path):
  """A bare workdir is its best checkpoint; a RunSource names another one and config overrides."""
  from deepflow import export
  workdir, record = stopped_run
  _, tensors, step = export.export_safetensors(workdir, str(tmp_path / "best"))
  assert step == record["best_step"]
  same(tensors["params/Dense_0/kernel"], direct(workdir, step, "best")["Dense_0"]["kernel"])
  source = RunSource(workdir, ("data.eval_batch_size=16",), checkpoint="latest")
  exp, state, step, which = source.open()
  assert (step, which, exp.config.data.eval_batch_size) == (record["last_step"], "latest", 16)
  _, tensors, step = export.export_safetensors(source, str(tmp_path / "latest"))
  assert step == record["last_step"]
  same(tensors["params/Dense_0/kernel"], direct(workdir, step)["Dense_0"]["kernel"])


def test_parse_checkpoint():
  assert [parse_checkpoint(v) for v in ("best", "latest", "12", 7)] == ["best", "latest", 12, 7]
  for bad in ("-1", "", "step3", True, -2):
    with pytest.raises(ConfigError, match="--checkpoint must be"):
      parse_checkpoint(bad)
