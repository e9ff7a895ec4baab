"""Hugging Face language models in deepflow against ``transformers`` itself: tiny random
checkpoints saved by ``transformers`` and its f32 logits and 32-token greedy ``generate``
(tests/fixtures/hf, written by tools/make_hf_fixtures.py) must come out of
``deepflow.load_pretrained`` and deepflow's sampler, with no torch here."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepflow
from deepflow import parallel
from deepflow.models import decoding
from deepflow.registry import ConfigError

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "hf")
NAMES = sorted(os.listdir(FIXTURES))
GREEDY = jax.jit(decoding.sample, static_argnums=(0, 3), static_argnames=("temperature",))
# Generation compiles the sampler (seconds each): one fixture per family and feature.
GENERATED = ["gpt2", "llama3_rope_mqa_tied", "mistral_window", "qwen3_qknorm_sharded"]


def reference(name):
  return dict(np.load(os.path.join(FIXTURES, name, "reference.npz")))


def check(name, generate: bool, **fields):
  """Logits within 1e-4 of transformers' (f32) and, with ``generate``, its 32 greedy tokens
  (deepflow's sampler with its key/value cache)."""
  ref = reference(name)
  model, variables = deepflow.load_pretrained(os.path.join(FIXTURES, name), dtype="float32",
                                              **fields)
  logits = jax.jit(model.apply)(variables, ref["tokens"])
  np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=1e-4)
  if generate:
    tokens = GREEDY(model, variables, ref["prompt"], 32, jax.random.PRNGKey(0),
                    temperature=0.0)
    np.testing.assert_array_equal(tokens, ref["generated"])


def test_fixtures_cover_the_families():
  types = {json.load(open(os.path.join(FIXTURES, n, "config.json")))["model_type"]
           for n in NAMES}
  assert types == {"gpt2", "llama", "mistral", "qwen2", "qwen3"}


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_greedy_generation_equal_transformers(name):
  check(name, generate=name in GENERATED)


@pytest.mark.parametrize("name", ["gpt2_eps", "mistral_window"])
def test_scanned_layers_equal_transformers(name):
  check(name, generate=name == "mistral_window", scan_layers=True)


@pytest.mark.parametrize("name", ["gpt2", "mistral_window"])
def test_packed_documents_equal_each_alone(name):
  """Two 8-token documents packed in one row (segments, positions restarting) give what
  transformers gives each alone: the first 8 logits of its rows (the model is causal). The
  Mistral window (6) is shorter than the documents."""
  ref = reference(name)
  model, variables = deepflow.load_pretrained(os.path.join(FIXTURES, name), dtype="float32")
  row = ref["tokens"][:, :8].reshape(1, 16)
  segments = np.repeat(np.array([[1, 2]]), 8, axis=1)
  positions = np.tile(np.arange(8), 2)[None]
  logits = jax.jit(model.apply)(variables, row, segments, positions)
  np.testing.assert_allclose(logits.reshape(2, 8, -1), ref["logits"][:, :8], rtol=0, atol=1e-4)


def test_bfloat16_checkpoint_loads_as_bfloat16():
  ref = reference("llama_gqa")
  model, variables = deepflow.load_pretrained(os.path.join(FIXTURES, "llama_gqa"))
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
  logits = np.asarray(jax.jit(model.apply)(variables, ref["tokens"]), np.float32)
  scale = np.abs(ref["logits"]).max()
  assert np.abs(logits - ref["logits"]).max() < 0.05 * scale  # bf16 compute, same weights


def test_sharded_placement_on_a_mesh():
  """With a mesh whose model axis is 2, kernels are split over it (deepflow's default rule:
  a matrix's output axis) as they are placed; the logits do not change."""
  mesh = parallel.make_mesh(_mesh_config(), jax.devices()[:2])
  ref = reference("llama_gqa")
  model, variables = deepflow.load_pretrained(os.path.join(FIXTURES, "llama_gqa"),
                                              dtype="float32", mesh=mesh)
  kernel = variables["params"]["block0"]["attn"]["q"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "model")
  assert len(kernel.addressable_shards) == 2
  np.testing.assert_allclose(jax.jit(model.apply)(variables, ref["tokens"]), ref["logits"],
                             rtol=0, atol=1e-4)


def _mesh_config():
  config = deepflow.base_config()
  config.mesh.shape.data, config.mesh.shape.model = 1, 2
  return config.mesh


def _copy(tmp_path, name="qwen3_qknorm_sharded"):
  path = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), path)
  return path


def _error(path, kind=ConfigError, **kwargs):
  with pytest.raises(kind) as info:
    deepflow.load_pretrained(str(path), **kwargs)
  message = str(info.value)
  assert "\n" not in message
  return message


def test_bad_directories_are_one_line(tmp_path):
  assert "no such directory" in _error(tmp_path / "absent", FileNotFoundError)
  assert "config.json is missing" in _error(tmp_path, FileNotFoundError)
  path = _copy(tmp_path)
  os.remove(path / "model-00002-of-00004.safetensors")
  assert "model-00002-of-00004.safetensors" in _error(path, FileNotFoundError)
  os.remove(path / "model.safetensors.index.json")
  assert "has neither model.safetensors nor" in _error(path, FileNotFoundError)


def _edit_config(path, **changes):
  config = json.loads((path / "config.json").read_text())
  config.update(changes)
  (path / "config.json").write_text(json.dumps(config))


def test_unsupported_and_mismatched_configs_are_one_line(tmp_path):
  path = _copy(tmp_path, "llama_gqa")
  _edit_config(path, model_type="mamba")
  message = _error(path)
  assert "'mamba' is not supported" in message and "qwen3" in message
  _edit_config(path, model_type="llama", hidden_size=64)
  assert "does not fit" in _error(path)
  _edit_config(path, hidden_size=32, num_hidden_layers=1)
  assert "unexpected 9: model.layers.1." in _error(path)
  _edit_config(path, num_hidden_layers=2, rope_parameters={"rope_type": "yarn", "factor": 2.0})
  assert "rope type 'yarn' is not supported" in _error(path)
  assert "not num_heads" in _error(path, num_heads=2)


def test_float64_checkpoint_names_the_fix(tmp_path):
  from deepflow.hf import files
  path = _copy(tmp_path, "gpt2")
  reader = files.Reader(files.weight_files(str(path)))
  tensors = {name: reader.read(name).astype(np.float64) for name in reader.files}
  files.write_safetensors(str(path / "model.safetensors"), tensors)
  assert "dtype='float32'" in _error(path)
  model, variables = deepflow.load_pretrained(str(path), dtype="float32")
  ref = reference("gpt2")
  np.testing.assert_allclose(jax.jit(model.apply)(variables, ref["tokens"]), ref["logits"],
                             atol=1e-4)
