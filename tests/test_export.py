"""deepflow export / predict: the artifact reproduces the in-framework model on raw inputs, at any
batch size, and refuses bad input and corrupted files with one line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import deepflow
from deepflow import config as config_lib, export, predict
from deepflow.data import sources, transforms as transforms_lib
from deepflow.data.pipeline import INPUTS
from deepflow.train.experiment import Experiment
from tests.helpers import deepflow_cli, one_line_error, tiny_config

RUNS = {
    "mlp": dict(model=dict(name="mlp", hidden=(32,)), source="bundled:digits",
                transforms=[dict(name="standardize")]),
    "cnn": dict(model=dict(name="cnn", features=(8,), dense=(16,)), source="bundled:digits",
                transforms=[dict(name="standardize")]),
    # NaN inputs: the traced impute (with indicator features) and minmax paths.
    "impute": dict(model=dict(name="mlp", hidden=(16,)), source="bundled:breast_cancer_missing",
                   transforms=[dict(name="impute", strategy="median", indicator=True),
                               dict(name="minmax")]),
}


def run_config(name, data_dir):
  run = RUNS[name]
  return tiny_config(model=run["model"], data__source=run["source"], data__data_dir=data_dir,
                     data__transforms=run["transforms"], train__steps=3, train__log_every=3)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """name -> (workdir, artifact directory): each run trained and exported once per module."""
  done = {}

  def get(name):
    if name not in done:
      workdir = str(tmp_path_factory.mktemp(f"run_{name}"))
      deepflow.train_and_evaluate(run_config(name, data_dir), workdir)
      out = os.path.join(workdir, "artifact")
      export.export(workdir, out, platforms=("cpu",))
      done[name] = workdir, out
    return done[name]
  return get


def in_framework(workdir, n):
  """Raw test inputs and the model's outputs on them through the framework's own (numpy)
  preprocessing and ``task.apply``."""
  exp, state, _, _ = Experiment.from_workdir(workdir)
  data = exp.pipeline.dataset
  raw = sources.take(data.split("test"), np.arange(n))
  batch = transforms_lib.apply_chain(exp.pipeline.transforms, exp.pipeline.stats, raw,
                                     data.input_key, data.target_key, train=False)
  outputs, _ = exp.task.apply(state.params, state.model_state, batch[data.input_key], None,
                              train=False)
  return np.asarray(raw[data.input_key]), np.asarray(outputs)


@pytest.mark.parametrize("name", list(RUNS))
def test_exported_outputs_equal_in_framework(name, trained):
  workdir, out = trained(name)
  inputs, expected = in_framework(workdir, 7)
  if name == "impute":
    assert np.isnan(inputs).any()  # the imputation really runs inside the exported function
  predictor = predict.load(out)
  for n in (1, 7):  # one symbolic batch dimension serves every batch size
    got = predictor(inputs[:n])
    assert got.shape == expected[:n].shape
    np.testing.assert_allclose(got, expected[:n], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(predictor(inputs[0]), expected[:1], rtol=1e-5, atol=1e-5)


def test_signature_describes_the_artifact(trained):
  workdir, out = trained("cnn")
  signature = json.load(open(os.path.join(out, export.SIGNATURE_FILE)))
  assert signature["input"] == {"name": "image", "shape": [None, 8, 8, 1], "dtype": "float32",
                                "raw_dtype": "float32", "accepts_missing": False}
  assert signature["output"]["kind"] == "logits"
  assert signature["output"]["class_names"] == [str(i) for i in range(10)]
  assert [p["name"] for p in signature["preprocessing"]] == ["standardize"]
  assert signature["source"]["step"] == 3 and signature["source"]["workdir"] == workdir
  assert signature["deepflow_version"] == deepflow.__version__
  assert set(signature["files"]) == {export.MODEL_FILE, export.WEIGHTS_FILE}
  with np.load(os.path.join(out, export.WEIGHTS_FILE)) as f:
    assert {"preprocessing/0/mean", "preprocessing/0/std"} <= set(f.files)
    assert any(k.startswith("params/Conv_0/") for k in f.files)


def test_variable_size_images_export_behind_their_per_example_steps(image_data_dir, tmp_path):
  """PNGs of 16-24 pixels a side, brought to 12x12 by random_resized_crop (eval: resize and
  centre crop, on the host): the artifact takes the cropped images and computes what eval
  computes from them (standardize, then the model)."""
  config = run_config("cnn", image_data_dir)
  with config.unlocked():
    config.data.source = "tfds:gen_png"
    config.data.transforms = [dict(name="random_resized_crop", size=12),
                              dict(name="standardize")]
  workdir, out = str(tmp_path / "run"), str(tmp_path / "artifact")
  deepflow.train_and_evaluate(config_lib.finalize(config), workdir)
  signature = export.export(workdir, out, platforms=("cpu",))
  assert signature["input"]["shape"] == [None, 12, 12, 3]
  assert [p["name"] for p in signature["preprocessing"]] == ["standardize"]
  assert signature["host_preprocessing"] == [
      {"name": "random_resized_crop", "options": {"size": 12}}]
  exp, state, _, _ = Experiment.from_workdir(workdir)
  test = exp.pipeline.dataset.split("test")
  cropped = exp.pipeline.examples(test, np.arange(5), train=False, step=0)["image"]
  evaluated = next(exp.pipeline.eval_batches("test"))[INPUTS][:5]  # eval's own preprocessing
  expected, _ = exp.task.apply(state.params, state.model_state, evaluated, None, train=False)
  np.testing.assert_allclose(predict.load(out)(cropped), expected, rtol=1e-5, atol=1e-5)


def test_predictor_checks_inputs(trained):
  predictor = predict.load(trained("mlp")[1])
  good = np.zeros((2, 8, 8, 1), np.float32)
  assert predictor(good.astype(np.float64)).shape == predictor(good.astype(np.int64)).shape
  for bad, message in [
      (np.zeros((2, 8, 8), np.float32), "input shape (2, 8, 8) does not match"),
      (np.zeros((0, 8, 8, 1), np.float32), "no examples"),
      (good.astype(np.complex64), "input dtype complex64 is not accepted"),
      (np.full((1, 8, 8, 1), np.nan, np.float32), "missing values (NaN)"),
  ]:
    with pytest.raises(predict.ArtifactError) as error:
      predictor(bad)
    assert message in str(error.value) and "\n" not in str(error.value)
  records = predictor.records(predictor(good))
  assert records[0]["class"] in predictor.class_names
  assert abs(sum(records[0]["probabilities"]) - 1) < 1e-4


def test_inputs_and_outputs_files(trained, tmp_path):
  predictor = predict.load(trained("mlp")[1])
  x = np.random.default_rng(0).normal(size=(3, 8, 8, 1))
  json.dump(x.tolist(), open(tmp_path / "x.json", "w"))
  np.testing.assert_array_equal(predict.read_inputs(str(tmp_path / "x.json")), x)
  outputs = predictor(x)
  predict.write_predictions(str(tmp_path / "y.npy"), predictor, outputs)
  np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), outputs)
  predict.write_predictions(str(tmp_path / "y.json"), predictor, outputs)
  assert len(json.load(open(tmp_path / "y.json"))) == 3


# ------------------------------------------------------------------------------------------------
# The commands, in subprocesses, as a user runs them.
# ------------------------------------------------------------------------------------------------

def test_export_and_predict_commands(trained, tmp_path):
  workdir, _ = trained("mlp")
  out = str(tmp_path / "model")
  done = deepflow_cli("export", "--workdir", workdir, "--out", out)
  assert done.returncode == 0, done.stderr
  assert "input (batch, 8, 8, 1) float32" in done.stdout
  assert json.load(open(os.path.join(out, "signature.json")))["platforms"] == ["cpu", "cuda",
                                                                                 "tpu"]
  inputs, expected = in_framework(workdir, 7)
  np.save(tmp_path / "x.npy", inputs)
  done = deepflow_cli("predict", "--model", out, "--input", str(tmp_path / "x.npy"))
  assert done.returncode == 0, done.stderr
  records = [json.loads(line) for line in done.stdout.splitlines()]
  assert [r["index"] for r in records] == expected.argmax(-1).tolist()


# What `deepflow predict` must not load: the training stack (its import costs seconds).
TRAINING_STACK = ("optax", "orbax", "grain", "flax", "tensorflow_datasets")
PREDICT_IN_A_FRESH_PROCESS = """
import json, runpy, sys
sys.argv = ["deepflow", "predict", "--model", sys.argv[1], "--input", sys.argv[2]]
try:
  runpy.run_module("deepflow", run_name="__main__")
except SystemExit as e:
  assert not e.code, e.code
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_predict_imports_no_training_stack(trained, tmp_path):
  workdir, out = trained("mlp")
  inputs, expected = in_framework(workdir, 4)
  np.save(tmp_path / "x.npy", inputs)
  done = subprocess.run([sys.executable, "-c", PREDICT_IN_A_FRESH_PROCESS, out,
                         str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=240)
  assert done.returncode == 0, done.stderr
  *records, loaded = done.stdout.splitlines()
  assert [json.loads(r)["index"] for r in records] == expected.argmax(-1).tolist()
  loaded = set(json.loads(loaded))
  assert "jax" in loaded and "deepflow" in loaded  # the list is of this process's modules
  assert not loaded & set(TRAINING_STACK), sorted(loaded & set(TRAINING_STACK))


@pytest.fixture
def broken(trained, tmp_path):
  """Artifacts and runs that are wrong in one way each."""
  import shutil
  workdir, out = trained("mlp")
  corrupted = str(tmp_path / "corrupted")
  shutil.copytree(out, corrupted)
  with open(os.path.join(corrupted, export.MODEL_FILE), "r+b") as f:
    f.seek(200)
    byte = f.read(1)
    f.seek(200)
    f.write(bytes([byte[0] ^ 1]))
  no_checkpoint = tmp_path / "no_checkpoint"
  no_checkpoint.mkdir()
  shutil.copy(os.path.join(workdir, "config.json"), no_checkpoint)
  np.save(tmp_path / "wrong_shape.npy", np.zeros((2, 64), np.float32))
  np.save(tmp_path / "wrong_dtype.npy", np.full((1, 8, 8, 1), "a"))
  np.save(tmp_path / "good.npy", np.zeros((2, 8, 8, 1), np.float32))
  return dict(out=out, corrupted=corrupted, no_checkpoint=str(no_checkpoint), tmp=tmp_path)


@pytest.mark.parametrize("case, message", [
    ("wrong_shape", "input shape (2, 64) does not match the model's (batch, 8, 8, 1)"),
    ("wrong_dtype", "input dtype <U1 is not accepted by the model, which takes float32"),
    ("corrupted", "model.bin does not match its checksum"),
    ("no_checkpoint", "no checkpoint in"),
])
def test_bad_input_is_one_line(broken, case, message):
  if case == "no_checkpoint":
    args = ["export", "--workdir", broken["no_checkpoint"], "--out", str(broken["tmp"] / "o")]
  else:
    model = broken["corrupted"] if case == "corrupted" else broken["out"]
    data = broken["tmp"] / ("good.npy" if case == "corrupted" else f"{case}.npy")
    args = ["predict", "--model", model, "--input", str(data)]
  assert message in one_line_error(deepflow_cli(*args))
