"""The `deepflow` command end to end, in subprocesses, as a user runs it."""
import json
import os
import subprocess
import sys

import pytest

from deepflow import cli
from tests.helpers import (deepflow_cli as deepflow, no_network, one_line_error,
                           subprocess_environment, write_experiment)


@pytest.fixture
def experiment(tmp_path):
  return write_experiment(tmp_path / "tiny.py")


def test_train_then_eval(tmp_path, experiment):
  workdir = str(tmp_path / "run")
  out = deepflow("train", "--config", experiment, "--workdir", workdir, "--config.train.steps=4")
  assert out.returncode == 0, out.stderr
  assert "final test metrics" in out.stdout and "accuracy=" in out.stdout
  assert json.load(open(os.path.join(workdir, "config.json")))["train"]["steps"] == 4
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert {r["split"] for r in records} == {"train", "test"}
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "4"]
  assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))

  again = deepflow("train", "--config", experiment, "--workdir", workdir,
                   "--config.train.steps=4")
  assert again.returncode == 0 and "already complete" in again.stderr

  ev = deepflow("eval", "--workdir", workdir, "--split", "train")
  assert ev.returncode == 0, ev.stderr
  assert "final train metrics at step 4" in ev.stdout
  last = json.loads(open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()[-1])
  assert last["split"] == "train" and last["step"] == 4


@pytest.mark.parametrize("args, message", [
    (["--config.train.stepz=3"], "unknown config key 'train.stepz'"),
    (["--config.model.name=nope"], "unknown model 'nope'"),
    (["--config.train.steps=abc"], "bad type for train.steps"),
    (["--config.data.source=tfds:mnist"], "is not prepared"),
    (["--config.model.init_from=w.npz", "--config.model.init_skip=head("],
     "model.init_skip 'head(' is not a regex"),
])
def test_bad_input_is_one_line(tmp_path, experiment, args, message):
  env, attempts = no_network(tmp_path)
  out = deepflow("train", "--config", experiment, "--workdir", str(tmp_path / "w"), *args,
                 env={"TFDS_DATA_DIR": str(tmp_path / "empty"), **env})
  assert message in one_line_error(out)
  assert not os.path.exists(attempts)  # a missing dataset fails at once: no download, no retries


def test_missing_experiment_file_and_workdir(tmp_path):
  assert "experiment file not found" in one_line_error(
      deepflow("train", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path)))
  assert "no config.json" in one_line_error(deepflow("eval", "--workdir", str(tmp_path)))


def test_an_unknown_split_lists_the_datasets_splits(tmp_path, experiment, data_dir):
  workdir = str(tmp_path / "run")
  out = deepflow("train", "--config", experiment, "--workdir", workdir, "--config.train.steps=2",
                 "--config.data.source=bundled:digits", f"--config.data.data_dir={data_dir}")
  assert out.returncode == 0, out.stderr
  assert ("dataset 'bundled:digits' has no split 'nope'; splits: test, train" in
          one_line_error(deepflow("eval", "--workdir", workdir, "--split", "nope")))


# Libraries that only some paths of `deepflow train` need; each would add from a few tenths of a
# second (pandas, for the co2 and sunspots builders) to seconds (PyTorch, which tensorboardX
# imports when it is installed) to the start of every run.
NOT_FOR_TRAINING = ("torch", "tensorboardX", "pandas", "statsmodels", "sklearn", "tensorflow")
TRAIN_IN_A_FRESH_PROCESS = """
import json, runpy, sys
sys.argv = ["deepflow", "train", *sys.argv[1:]]
try:
  runpy.run_module("deepflow", run_name="__main__")
except SystemExit as e:
  assert not e.code, e.code
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_train_loads_no_library_it_does_not_use(tmp_path, experiment, data_dir):
  from deepflow.data.pipeline import Pipeline
  from tests.helpers import tiny_config
  Pipeline(tiny_config("data.source=bundled:digits", f"data.data_dir={data_dir}"))  # prepared
  done = subprocess.run(
      [sys.executable, "-c", TRAIN_IN_A_FRESH_PROCESS, "--config", experiment, "--workdir",
       str(tmp_path / "run"), "--config.train.steps=2", "--config.data.source=bundled:digits",
       f"--config.data.data_dir={data_dir}"], capture_output=True, text=True, timeout=240,
      env=subprocess_environment())
  assert done.returncode == 0, done.stderr
  loaded = set(json.loads(done.stdout.splitlines()[-1]))
  assert {"jax", "deepflow", "orbax", "tensorflow_datasets"} <= loaded  # this process's modules
  assert not loaded & set(NOT_FOR_TRAINING), sorted(loaded & set(NOT_FOR_TRAINING))
  assert os.listdir(tmp_path / "run" / "tensorboard")


def test_an_error_inside_get_config_names_the_file_and_line(tmp_path):
  path = write_experiment(tmp_path / "broken.py", "from deepflow.config import base_config\n\n"
                          "def get_config():\n  c = base_config()\n  c.model.width = 1 / 0\n")
  assert one_line_error(deepflow("train", "--config", path, "--workdir", str(tmp_path / "w"))) == (
      f"deepflow: error: get_config() in {path}:5 raised ZeroDivisionError: division by zero")


def test_help_lists_the_commands_and_each_commands_flags():
  top = deepflow("--help")
  assert top.returncode == 0, top.stderr
  commands = [line.split()[0] for line in top.stdout.split("commands:\n")[1].split("\n\n")[0]
              .splitlines()]
  assert commands == list(cli.COMMANDS) and {"train", "eval", "predict", "data"} <= set(commands)
  for name in commands:
    out = deepflow(name, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: deepflow {name} ")
    assert any(f"  --{flag}: " in out.stdout for flag in ("workdir", "model", "config",
                                                            "data_dir"))
    assert f"example:\n  deepflow {name} " in out.stdout
  train = deepflow("train", "-h").stdout
  assert "--config: Experiment file" in train and "--sweep" not in train
  assert "--config.KEY=VALUE" in train and "--config.KEY" not in deepflow("data", "-h").stdout
  assert "--config.KEY" not in deepflow("predict", "-h").stdout  # predict takes no overrides
