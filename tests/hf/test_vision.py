"""Hugging Face ViT and ResNet checkpoints in deepflow: the fixtures (written once by
tools/make_hf_vision_fixtures.py with transformers) loaded through ``deepflow.hf.vit`` /
``deepflow.hf.resnet`` give transformers' logits, and export writes the checkpoint back
exactly."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

from deepflow.hf import resnet, vit
from deepflow.models import lora
from deepflow.registry import MODELS, ConfigError

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "hf_vision")
NAMES = sorted(os.listdir(FIXTURES))
FAMILIES = {"vit": vit, "resnet": resnet}


def read(name: str):
  """(family module, config.json, the checkpoint's tensors, reference images and logits)."""
  path = os.path.join(FIXTURES, name)
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  tensors = load_file(os.path.join(path, "model.safetensors"))
  return (FAMILIES[config["model_type"]], config, tensors,
          np.load(os.path.join(path, "reference.npz")))


def fixed(family, config) -> dict:
  return family.fixed_tensors(config) if hasattr(family, "fixed_tensors") else {}


def build(family, config, **fields):
  section = {**family.model_section(config), **fields}
  return MODELS.get(section.pop("name"))(**section)


def load(family, config, tensors) -> dict:
  """Every tensor placed by its rule; the checkpoint must hold exactly the rules' tensors."""
  rules = family.weight_rules(config)
  assert sorted(tensors) == sorted([r.hf_name for r in rules] + list(fixed(family, config)))
  return traverse_util.unflatten_dict(
      {r.path: jnp.asarray(r.to_deepflow(tensors[r.hf_name])) for r in rules}, sep="/")


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_transformers(name):
  family, config, tensors, reference = read(name)
  model = build(family, config)
  variables = load(family, config, tensors)
  expected = jax.eval_shape(model.init, jax.random.key(0), family.example_inputs(config))
  assert (jax.tree.map(lambda v: (v.shape, v.dtype), variables)
          == jax.tree.map(lambda v: (v.shape, v.dtype), expected))
  logits = jax.jit(model.apply)(variables, reference["images"])
  np.testing.assert_allclose(logits, reference["logits"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_export_writes_the_checkpoint_back(name):
  family, config, tensors, _ = read(name)
  flat = traverse_util.flatten_dict(load(family, config, tensors), sep="/")
  written = {r.hf_name: np.asarray(r.to_hf(np.asarray(flat[r.path])))
             for r in family.weight_rules(config)}
  written.update(fixed(family, config))
  assert sorted(written) == sorted(tensors)
  for key, value in tensors.items():
    assert written[key].dtype == value.dtype and written[key].shape == value.shape, key
    np.testing.assert_array_equal(written[key], value, err_msg=key)
  # The model section -> config.json -> model section, and config.json's architecture fields.
  section = family.model_section(config)
  exported = family.hf_config({**section, "num_channels": config["num_channels"]})
  assert family.model_section(exported) == section
  for key, value in exported.items():
    assert config[key] == value, key


@pytest.mark.parametrize("name, change, message", [
    ("vit_base_layout", {"architectures": ["ViTModel"]}, "reads ViTForImageClassification"),
    ("vit_base_layout", {"attention_probs_dropout_prob": 0.1}, "no attention dropout"),
    ("vit_base_layout", {"hidden_act": "quick_gelu"}, "hidden_act 'quick_gelu'"),
    ("vit_base_layout", {"image_size": [16, 24]}, "square"),
    ("resnet_bottleneck", {"hidden_sizes": [8, 24, 32]}, re.escape("double: [8, 16, 32]")),
    ("resnet_bottleneck", {"layer_type": "preact"}, "known: basic, bottleneck"),
])
def test_unsupported_config_is_one_line(name, change, message):
  family, config, _, _ = read(name)
  config.update(change)
  with pytest.raises(ConfigError, match=message) as error:
    family.model_section(config)
  assert "\n" not in str(error.value)
  with pytest.raises(ConfigError, match=message):
    family.weight_rules(config)


def test_export_refuses_what_transformers_cannot_express():
  with pytest.raises(ConfigError, match="model 'resnet' is not a vit"):
    vit.hf_config({"name": "resnet", "num_outputs": 3})
  with pytest.raises(ConfigError, match="padding='same' on export"):
    resnet.hf_config({"name": "resnet", "stem": "imagenet", "num_outputs": 3})
  with pytest.raises(ConfigError, match="split_qkv=False"):
    vit.hf_config({"name": "vit", "image_size": 8, "num_outputs": 3})
  with pytest.raises(ConfigError, match="set model.image_size"):
    vit.hf_config({"name": "vit", "split_qkv": True, "num_outputs": 3})


def test_vit_refuses_images_of_another_size():
  family, config, tensors, reference = read("vit_base_layout")
  with pytest.raises(ConfigError, match="takes 16x16 images .* got 8x8"):
    build(family, config).apply(load(family, config, tensors), reference["images"][:, :8, :8])


def test_vit_layout_scans_remats_and_takes_adapters():
  """The checkpoint's blocks stacked for ``scan_layers`` (with ``remat_policy='full'``) give the
  same logits; LoRA's default targets reach the separate query/key/value kernels."""
  family, config, tensors, reference = read("vit_base_layout")
  params = dict(load(family, config, tensors)["params"])
  blocks = [params.pop(f"block{i}") for i in range(config["num_hidden_layers"])]
  params["blocks"] = {"block": jax.tree.map(lambda *x: jnp.stack(x), *blocks)}
  model = build(family, config, scan_layers=True, remat_policy="full")
  logits = jax.jit(model.apply)({"params": params}, reference["images"])
  np.testing.assert_allclose(logits, reference["logits"], rtol=0, atol=1e-4)
  adapted = lora.add_adapters(params, lora.LoraConfig(2, 1.0, r"kernel$"), jax.random.key(0))
  flat = traverse_util.flatten_dict(adapted, sep="/")
  attention = "blocks/block/SelfAttention_0"
  assert {f"{attention}/{n}/lora_a" for n in ("query", "key", "value")} <= set(flat)


def test_resnet_layout_remats():
  family, config, tensors, reference = read("resnet_bottleneck_v1")
  model = build(family, config, remat=True)
  logits = jax.jit(model.apply)(load(family, config, tensors), reference["images"])
  np.testing.assert_allclose(logits, reference["logits"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet_basic", "vit_no_qkv_bias"])
def test_a_new_label_set_starts_a_fresh_head(name, caplog):
  """init_from='hf:DIR' on a dataset with other classes: every variable but the classifier's
  is the checkpoint's, the head starts fresh and the log says so; on the checkpoint's own
  classes the head is loaded too."""
  import types
  from jax.sharding import SingleDeviceSharding
  from deepflow.hf import finetune
  family, config, tensors, _ = read(name)
  checkpoint = traverse_util.flatten_dict(load(family, config, tensors), sep="/")
  section = types.SimpleNamespace(init_from=f"hf:{os.path.join(FIXTURES, name)}", init_skip="")
  one = SingleDeviceSharding(jax.devices()[0])
  theirs = family.model_section(config)["num_outputs"]
  for outputs, fresh in ((theirs + 2, ["params/head/bias", "params/head/kernel"]), (theirs, [])):
    caplog.clear()
    model = build(family, config, num_outputs=outputs)
    target = traverse_util.flatten_dict(
        jax.eval_shape(model.init, jax.random.key(0), family.example_inputs(config)), sep="/")
    loaded = finetune.initial_variables(section, target, dict.fromkeys(target, one),
                                        scanned=False, lora=False)
    assert sorted(set(target) - set(loaded)) == fresh
    for path, value in loaded.items():
      np.testing.assert_array_equal(value, checkpoint[path], err_msg=path)
    assert (f"new classifier head of {outputs} outputs" in caplog.text) == bool(fresh)


def test_vit_finetune_experiment_trains_a_new_head(tmp_path, monkeypatch, image_data_dir,
                                                   caplog):
  """experiments/hf_vit_finetune.py with a tiny ViT where its CHECKPOINT lies, on generated
  16x16 JPEGs of 10 classes (the checkpoint has 5): the model section is the checkpoint's, the
  head starts fresh, two steps train, and the accuracy is the restored model's."""
  import importlib.util
  import shutil
  import deepflow
  from tests.helpers import reference_accuracy
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "experiments",
                      "hf_vit_finetune.py")
  spec = importlib.util.spec_from_file_location("hf_vit_finetune", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  monkeypatch.chdir(tmp_path)
  shutil.copytree(os.path.join(FIXTURES, "vit_base_layout"), module.CHECKPOINT)
  config = deepflow.load_config(path, [
      "data.source=tfds:gen_jpeg", f"data.data_dir={image_data_dir}", "data.batch_size=16",
      "data.eval_batch_size=32", "data.transforms=[{'name': 'resize', 'size': (16, 16)}, "
      "{'name': 'minmax', 'per': 'global', 'low': -1.0, 'high': 1.0}]", "train.steps=2",
      "train.eval_every=0", "train.checkpoint_every=0", "train.progress=False",
      "train.compute_dtype=float32", "optimizer.warmup_steps=1"])
  assert (config.model.name, config.model.image_size, config.model.split_qkv) == ("vit", 16, True)
  metrics = deepflow.train_and_evaluate(config, "run")
  assert "new classifier head of 10 outputs" in caplog.text
  assert metrics["accuracy"] == pytest.approx(reference_accuracy("run"), abs=1e-6)
