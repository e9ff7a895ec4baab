"""Training from a Hugging Face checkpoint (``model.init_from='hf:DIR'``): the model section
comes from its config.json, the run starts from its weights, and a fine-tuned run exports
(LoRA merged) to a checkpoint that gives the run's logits."""
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

import deepflow
from deepflow import config as config_lib
from deepflow.hf import export as hf_export
from deepflow.models.llama import Llama
from deepflow.registry import ConfigError
from deepflow.train import init_from
from deepflow.train.experiment import Experiment
from tests.helpers import deepflow_cli, experiment, tiny

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "hf")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A llama checkpoint whose vocabulary (128) holds the bundled text's 103 characters."""
  model = Llama(num_outputs=128, vocab_size=128, d_model=32, num_heads=4, num_kv_heads=2,
                mlp_dim=48, max_len=128, rope_theta=500.0)
  variables = model.init(jax.random.PRNGKey(3), np.zeros((1, 4), np.int32))
  path = str(tmp_path_factory.mktemp("hf") / "llama")
  hf_export.write_pretrained(model, variables, path)
  return path


def text_config(data_dir, init_from, *overrides, **model):
  config = experiment("text_transformer")[1].get_config()
  config.model = dict(init_from=f"hf:{init_from}", **model)
  return config_lib.finalize(config, [*tiny(data_dir, steps=2), "train.eval_every=0",
                                      "data.batch_size=8", "data.eval_split='test[:2%]'",
                                      "optimizer.warmup_steps=0", *overrides])


def test_the_checkpoint_gives_the_model_section(data_dir, checkpoint):
  config = text_config(data_dir, checkpoint, "model.dropout=0.1", "model.scan_layers=True")
  assert (config.model.name, config.model.num_kv_heads, config.model.rope_theta) == (
      "llama", 2, 500.0)
  assert config.model.dropout == 0.1 and config.model.scan_layers
  with pytest.raises(ConfigError, match=r"model.d_model=48 contradicts .*config.json "
                                        r"\(d_model=32\)") as info:
    text_config(data_dir, checkpoint, "model.d_model=48")
  assert "\n" not in str(info.value)
  with pytest.raises(ConfigError, match="model.num_heads=2 contradicts"):
    text_config(data_dir, checkpoint, num_heads=2)


def test_data_outside_the_vocabulary_is_one_line(data_dir):
  config = text_config(data_dir, os.path.join(FIXTURES, "llama_gqa"))
  with pytest.raises(ConfigError, match="smaller than the data's vocabulary of 103"):
    Experiment(config, None)


def test_finetuned_run_with_lora_exports_and_loads_back(tmp_path, data_dir, checkpoint):
  """The run's first state holds the checkpoint's weights exactly; after 2 LoRA steps
  `deepflow export --format hf` writes a checkpoint that gives the run's logits (adapters
  merged) and carries the run's tokenizer files."""
  config = text_config(data_dir, checkpoint, "optimizer.learning_rate=0.01",
                       lora=dict(rank=2, alpha=1.0, targets=r"attn/(q|v)/kernel$"))
  exp = Experiment(config, None)
  first = init_from.initial_state(exp)
  _, source = deepflow.load_pretrained(checkpoint)
  started = traverse_util.flatten_dict(first.params, sep="/")
  weights = traverse_util.flatten_dict(source["params"], sep="/")
  assert sorted(k for k in started if "lora_" not in k) == sorted(weights)
  for path, value in weights.items():
    np.testing.assert_array_equal(started[path], value, err_msg=path)
  workdir, out = str(tmp_path / "run"), str(tmp_path / "hf")
  deepflow.train_and_evaluate(config, workdir)
  (tmp_path / "run" / "hf_tokenizer").mkdir()  # where a data.tokenizer='hf:...' run keeps its copy
  (tmp_path / "run" / "hf_tokenizer" / "tokenizer.json").write_text("{}")
  done = deepflow_cli("export", "--workdir", workdir, "--format", "hf", "--out", out)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "exported step 2" in done.stdout and "tokenizer.json" in done.stdout
  assert os.path.isfile(f"{out}/tokenizer.json")
  exp, state, _, _ = Experiment.from_workdir(workdir)
  tokens = np.arange(24, dtype=np.int32).reshape(2, 12) % 103
  expected, _ = exp.task.apply(exp.model_params(state.params), state.model_state, tokens, None,
                               train=False)
  merged = exp.model_params(state.params)["block0"]["attn"]["q"]["kernel"]
  assert np.abs(merged - state.params["block0"]["attn"]["q"]["kernel"]).max() > 1e-3
  model, variables = deepflow.load_pretrained(out)
  np.testing.assert_allclose(model.apply(variables, tokens), expected, rtol=0, atol=1e-5)


def test_finetune_experiment_trains_from_its_checkpoint(tmp_path, monkeypatch, data_dir,
                                                         checkpoint):
  """experiments/hf_finetune.py with a tiny llama where its CHECKPOINT lies (relative to the
  working directory), on the bundled characters instead of the checkpoint's tokenizer: the
  model section is the checkpoint's, LoRA adapts q and v, two steps train."""
  import shutil
  path, module = experiment("hf_finetune")
  monkeypatch.chdir(tmp_path)
  shutil.copytree(checkpoint, module.CHECKPOINT)
  config = deepflow.load_config(path, [
      *tiny(data_dir, steps=2), "data.source=bundled:text", "data.tokenizer=''",
      "data.eval_split='test[:2%]'", "train.eval_every=0", "train.checkpoint_every=0"])
  assert config.model.name == "llama" and config.model.d_model == 32
  metrics = deepflow.train_and_evaluate(config, "runs/hf_finetune")
  assert np.isfinite(metrics["loss"])
