import json

import pytest

import deepflow
from deepflow import config as config_lib
from deepflow.registry import ConfigError, Registry
from tests.helpers import tiny_config


def test_experiment_file_loads_with_overrides():
  c = deepflow.load_config("experiments/digits_cnn.py",
                           ["train.steps=10", "optimizer.learning_rate=0.1", "model.features=(8,)"])
  assert c.train.steps == 10 and c.optimizer.learning_rate == 0.1
  assert tuple(c.model.features) == (8,)
  assert c.model.kernel_size == 3  # the model's own defaults are filled in


@pytest.mark.parametrize("override, message", [
    ("train.stpes=10", "unknown config key 'train.stpes'"),
    ("train.steps=ten", "bad type for train.steps"),
    ("train.steps=-1", "train.steps must be a positive integer"),
    ("model.name=resnett", "unknown model 'resnett'"),
    ("optimizer.name=adamm", "did you mean 'adam'"),
    ("optimizer.schedule=nope", "unknown schedule"),
    ("data.source=nowhere", "data.source 'nowhere' must look like"),
    ("data.batch_size=12", "not divisible by the 8 devices"),
    ("model.widthh=3", "unknown config key 'model.widthh'"),
    ("noequals", "is not KEY=VALUE"),
])
def test_bad_config_is_one_line_error(override, message):
  with pytest.raises(ConfigError) as e:
    tiny_config(override)
  assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (["model.init_layout=torch"], "init_layout must be one of deepflow, pytorch, got 'torch'"),
    (["model.init_map=[('a', 'b', 'c')]"], "each model.init_map entry must be (regex, repl"),
    (["model.init_map=['a']"], "each model.init_map entry must be (regex, replacement), got 'a'"),
    (["model.init_map=[('enc(', 'b')]"], "model.init_map 'enc(' is not a regex"),
    (["model.init_skip=head["], "model.init_skip 'head[' is not a regex"),
])
def test_bad_transfer_keys_are_one_line_errors_before_loading(overrides, message):
  """Checked with the config: the source (a file that does not exist here) is never read."""
  with pytest.raises(ConfigError) as e:
    tiny_config("model.init_from=/nowhere/w.npz", *overrides)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_transfer_keys_may_stay_set_without_a_source():
  """A recipe's from-scratch baseline clears only init_from (as digits_finetune's does)."""
  config = tiny_config("model.init_skip=^params/head/", "model.init_map=[('a', 'b')]")
  assert not config.model.init_from and config.model.init_skip == "^params/head/"


def test_config_is_locked():
  c = tiny_config()
  with pytest.raises(AttributeError):
    c.train.not_a_key = 1


def test_json_round_trip_gives_the_same_config():
  c = tiny_config("train.steps=3")
  again = config_lib.config_from_json(config_lib.to_json(c))
  assert json.loads(config_lib.to_json(again)) == json.loads(config_lib.to_json(c))


def test_parse_value():
  assert config_lib.parse_value("3") == 3
  assert config_lib.parse_value("1e-3") == 1e-3
  assert config_lib.parse_value("true") is True
  assert config_lib.parse_value("(1, 2)") == (1, 2)
  assert config_lib.parse_value("relu") == "relu"


def test_registry_lists_known_names():
  r = Registry("widget")
  r.register("a")(1)
  assert r.get("a") == 1
  with pytest.raises(ConfigError, match="unknown widget 'b'; known: a"):
    r.get("b")
  with pytest.raises(ValueError):
    r.register("a")(2)


def test_experiment_with_unknown_model_field_is_rejected(tmp_path):
  path = tmp_path / "exp.py"
  path.write_text("from deepflow.config import base_config\n"
                  "def get_config():\n  c = base_config()\n"
                  "  c.model = dict(name='mlp', hiden=(3,))\n  return c\n")
  with pytest.raises(ConfigError, match="model 'mlp' has no option 'hiden'"):
    deepflow.load_config(path)
  path.write_text("from deepflow.config import base_config\n"
                  "def get_config():\n  c = base_config()\n  c.trian = 3\n  return c\n")
  with pytest.raises(ConfigError, match="unknown config key 'trian'"):
    deepflow.load_config(path)
