"""`deepflow sample` end to end, in subprocesses: text from a trained language model, and
one-line errors for a model that is not generative, a run with no checkpoint and a prompt
longer than the model's context."""
import os

import pytest

import deepflow
from deepflow import config as config_lib
from tests.helpers import deepflow_cli as deepflow_run, one_line_error, tiny_config


@pytest.fixture(scope="module")
def lm_run(data_dir, tmp_path_factory):
  """A tiny character Transformer LM trained for two steps (in this process: it is faster)."""
  config = tiny_config(
      model=dict(name="transformer_lm", d_model=16, num_heads=2, num_layers=1, mlp_dim=32,
                 max_len=128),
      task__name="language_model", data__source="bundled:text", data__data_dir=data_dir,
      data__transforms=[], data__batch_size=16, data__eval_batch_size=128, train__steps=2)
  workdir = str(tmp_path_factory.mktemp("lm_run"))
  deepflow.train_and_evaluate(config, workdir)
  return workdir


def test_sample_text_from_a_language_model(lm_run):
  out = deepflow_run("sample", "--workdir", lm_run, "--num", "2", "--prompt", "The ",
                     "--num_tokens", "20", "--temperature", "0.8", "--top_k", "10")
  assert out.returncode == 0, out.stderr
  assert "--- sample 1 ---\nThe " in out.stdout and "--- sample 2 ---\nThe " in out.stdout
  assert "2 samples from the checkpoint at step 2" in out.stdout
  with open(os.path.join(lm_run, "samples", "samples.txt")) as f:
    text = f.read()
  assert text.count("--- sample") == 2 and text in out.stdout


def test_prompt_longer_than_the_context_is_one_line(lm_run):
  out = deepflow_run("sample", "--workdir", lm_run, "--prompt", "x" * 120, "--num_tokens", "20")
  assert "exceeds the model's max_len 128" in one_line_error(out)


def test_not_generative_and_no_checkpoint_are_one_line(tmp_path):
  workdir = str(tmp_path / "classifier")
  deepflow.train_and_evaluate(tiny_config("train.steps=1"), workdir)
  out = deepflow_run("sample", "--workdir", workdir)
  assert "task 'classification' with model 'mlp' is not generative" in one_line_error(out)
  empty = tmp_path / "untrained"
  empty.mkdir()
  (empty / "config.json").write_text(config_lib.to_json(tiny_config()))
  assert "no checkpoint in" in one_line_error(deepflow_run("sample", "--workdir", str(empty)))
  assert "no config.json" in one_line_error(deepflow_run("sample", "--workdir",
                                                         str(tmp_path / "nowhere")))
