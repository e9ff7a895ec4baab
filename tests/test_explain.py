"""`deepflow explain`: attributions of a trained run's checkpoint, in Python and on the CLI."""
import os

import numpy as np
import pytest

import deepflow
from deepflow import config as config_lib, explain
from deepflow.analysis import attributions
from deepflow.registry import ConfigError
from deepflow.train import checkpoint as checkpoint_lib
from deepflow.train.experiment import Experiment
from tests.helpers import deepflow_cli, tiny_config

CNN = dict(name="cnn", features=(4,), dense=(8,))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny CNN run on digits-shaped images with a checkpoint (trained once per module)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  deepflow.train_and_evaluate(tiny_config("train.steps=3", model=CNN), workdir)
  return workdir


def test_cli_writes_the_grid_and_the_arrays(run):
  out = deepflow_cli("explain", "--workdir", run, "--method", "integrated_gradients",
                     "--num-examples", "5", "--option", "steps=8")
  assert out.returncode == 0, out.stderr
  png = os.path.join(run, "explain", "integrated_gradients.png")
  npz = os.path.join(run, "explain", "integrated_gradients.npz")
  assert f"attributions of 5 test examples at step 3: {png} {npz}" in out.stdout
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  arrays = np.load(npz)
  assert arrays["inputs"].shape == arrays["attributions"].shape == (5, 8, 8, 1)
  for key in ("labels", "predictions", "targets"):
    assert arrays[key].shape == (5,) and arrays[key].dtype == np.int32
  np.testing.assert_array_equal(arrays["targets"], arrays["predictions"])


def test_python_api_equals_the_method_on_the_restored_model(run):
  result = explain.explain(run, "integrated_gradients", 4, target="label", split="train",
                           options={"steps": 8, "baseline": "mean"})
  with open(os.path.join(run, "config.json")) as f:
    config = config_lib.config_from_json(f.read())
  exp = Experiment(config, run)
  checkpointer = checkpoint_lib.Checkpointer(run, read_only=True)
  state, _, step = exp.restore(checkpointer)
  checkpointer.close()
  batch = next(exp.pipeline.eval_batches("train"))
  inputs, labels = batch["inputs"][:4], batch["targets"][:4]
  logits = lambda x: exp.task.model.apply({"params": state.params}, x)  # noqa: E731
  expected = attributions.integrated_gradients(logits, inputs, labels, steps=8, baseline="mean")
  assert result.step == step == 3 and result.split == "train"
  np.testing.assert_allclose(result.inputs, inputs)
  np.testing.assert_array_equal(result.targets, labels)
  np.testing.assert_array_equal(result.predictions, np.argmax(logits(inputs), -1))
  np.testing.assert_allclose(result.attributions, expected, rtol=1e-4, atol=1e-6)
  assert os.path.exists(os.path.join(run, "explain", "integrated_gradients.png"))


def test_every_method_runs(run):
  for method in attributions.METHODS.names():
    options = {"integrated_gradients": {"steps": 4}, "smoothgrad": {"samples": 4},
               "occlusion": {"patch": 4}}.get(method, {})
    result = explain.explain(run, method, 3, options=options)
    assert result.attributions.shape == (3, 8, 8, 1)
    assert np.isfinite(result.attributions).all() and np.abs(result.attributions).sum() > 0


def test_bad_requests_are_config_errors(run):
  with pytest.raises(ConfigError, match="unknown attribution method"):
    explain.explain(run, "lime")
  with pytest.raises(ConfigError, match="unknown option.*'stepz'"):
    explain.explain(run, "integrated_gradients", options={"stepz": 3})
  with pytest.raises(ConfigError, match="target must be"):
    explain.explain(run, "saliency", target="other")
  assert explain.parse_options(["steps=8", "baseline=mean", "patch=(2, 2)"]) == {
      "steps": 8, "baseline": "mean", "patch": (2, 2)}


def test_no_checkpoint_is_one_line(tmp_path, run):
  workdir = tmp_path / "untrained"
  workdir.mkdir()
  with open(os.path.join(run, "config.json")) as f:
    (workdir / "config.json").write_text(f.read())
  for target, message in ((workdir, "no checkpoint in"), (tmp_path / "missing", "no config.json")):
    out = deepflow_cli("explain", "--workdir", str(target))
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("deepflow: error:")]
    assert len(errors) == 1 and message in errors[0], out.stderr
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    explain.explain(str(workdir))
