"""LoRA (deepflow.models.lora): the adapted forward pass against the adapter formula, only
adapters train, and the merged export computes what the adapters did."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepflow
from deepflow import export, parallel, pytree
from deepflow.models import lora
from deepflow.registry import ConfigError
from deepflow.train import init_from
from deepflow.train.experiment import Experiment
from deepflow.train.step import gradient_fn
from deepflow.weights import files
from tests.helpers import tiny_config
from tests.numerics import assert_same_math

MLP = dict(name="mlp", hidden=(16,))
LORA = ("model.lora.rank=2", "model.lora.alpha=4.0")


def experiment(*overrides):
  return Experiment(tiny_config(*overrides, model=MLP, num_devices=1), None,
                    devices=jax.devices()[:1])


def test_adapted_forward_is_the_lora_formula():
  exp = experiment(*LORA, "model.lora.targets=Dense_0/kernel")
  params = exp.init_state().params
  assert set(params["Dense_0"]) == {"kernel", "bias", "lora_a", "lora_b"}
  assert set(params["Dense_1"]) == {"kernel", "bias"}
  x = np.random.default_rng(0).normal(size=(5, 8, 8, 1)).astype(np.float32)
  start, _ = exp.task.apply(exp.model_params(params), {}, x, None, train=False)
  params["Dense_0"]["lora_b"] = jax.random.normal(jax.random.PRNGKey(1), (2, 16))
  out, _ = exp.task.apply(exp.model_params(params), {}, x, None, train=False)
  d0, d1 = params["Dense_0"], params["Dense_1"]
  flat = x.reshape(5, -1)
  hidden = flat @ d0["kernel"] + (4.0 / 2) * (flat @ d0["lora_a"]) @ d0["lora_b"] + d0["bias"]
  reference = jax.nn.relu(hidden) @ d1["kernel"] + d1["bias"]
  np.testing.assert_allclose(out, reference, atol=1e-5)
  base = {k: {n: v for n, v in p.items() if not n.startswith("lora")} for k, p in params.items()}
  np.testing.assert_allclose(start, exp.task.model.apply({"params": base}, x), atol=1e-6)


def test_only_the_adapters_are_differentiated():
  """The gradient of the adapters is what differentiating every parameter gives them; every
  other parameter gets zeros, and the head's kernel gradient (the one dot_general giving a
  16x10 result) is not in the program."""
  exp = experiment(*LORA, "model.lora.targets=Dense_0/kernel")
  state = exp.init_state()
  params = jax.tree.map(lambda x: x + 0.1, state.params)  # lora_b off zero: both adapters move
  batch = next(exp.pipeline.train_iterator())
  args = (params, {}, batch, jax.random.PRNGKey(0))
  grads, _, _ = jax.jit(gradient_fn(exp.update))(*args)
  full = jax.grad(lambda p: exp.task.loss(exp.model_params(p), {}, batch, args[-1])[0])(params)
  for name in lora.ADAPTERS:
    assert_same_math(grads["Dense_0"][name], full["Dense_0"][name])
    assert np.any(grads["Dense_0"][name])
  others = [grads["Dense_0"]["kernel"], grads["Dense_0"]["bias"], *grads["Dense_1"].values()]
  assert not any(np.any(leaf) for leaf in others)
  text = jax.jit(gradient_fn(exp.update)).lower(*args).as_text()
  assert not any("dot_general" in line and line.endswith("-> tensor<16x10xf32>")
                 for line in text.splitlines())


def test_attention_kernels_split_into_inputs_and_outputs():
  assert lora.split_axis((64, 32)) == 1
  assert lora.split_axis((64, 3, 4, 16)) == 1  # qkv: (d | 3, heads, head_dim)
  assert lora.split_axis((4, 16, 64)) == 2  # out: (heads, head_dim | d)


def test_only_adapters_train_and_the_merged_export_matches(tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(*LORA, "train.steps=3", model=MLP)
  deepflow.train_and_evaluate(config, workdir)
  restored = Experiment.from_workdir(workdir, checkpoint="latest")
  trained, fresh = restored.state.params, restored.experiment.init_state().params
  after = files.flatten(jax.device_get(trained))
  for name, value in files.flatten(fresh).items():
    if lora.is_adapter(name):  # lora_b moves at step 1 (from zero), lora_a from step 2 on
      assert not np.array_equal(after[name], value), name
    else:
      assert after[name].tobytes() == value.tobytes(), name
  assert restored.experiment.partition.count(trained) == (2 * (64 + 16) + 2 * (16 + 10),
                                                          64 * 16 + 16 + 170 + 212)
  path, tensors, _ = export.export_safetensors(workdir, str(tmp_path / "merged.safetensors"))
  assert not any(lora.is_adapter(k) for k in tensors)
  plain = experiment(f"model.init_from={path}")
  state = init_from.initial_state(plain)
  x = np.random.default_rng(0).normal(size=(5, 8, 8, 1)).astype(np.float32)
  merged, _ = plain.task.apply(state.params, {}, x, None, train=False)
  adapted, _ = restored.experiment.task.apply(
      restored.experiment.model_params(parallel.to_host(trained)), {}, x, None, train=False)
  np.testing.assert_allclose(merged, adapted, rtol=0, atol=1e-5)
  base = {k: v for k, v in files.flatten(jax.device_get(trained)).items()
          if not lora.is_adapter(k)}
  unadapted = plain.task.model.apply({"params": pytree.unflatten(base)}, x)
  assert not np.allclose(merged, unadapted, atol=1e-4)


def test_a_target_regex_that_matches_nothing_is_one_line():
  with pytest.raises(ConfigError) as error:
    experiment(*LORA, "model.lora.targets=attention")
  assert "model.lora.targets 'attention' matches no kernel; the model's are: Dense_0/kernel" in (
      str(error.value))
  assert "\n" not in str(error.value)


def test_two_adapted_kernels_in_one_module_are_refused():
  """Adapters are named by their module, so a second kernel there would overwrite the first's."""
  params = {"block": {"query": jnp.zeros((4, 4)), "value": jnp.zeros((4, 4))},
            "head": {"kernel": jnp.zeros((4, 2))}}
  with pytest.raises(ConfigError, match=r"matches several kernels of one module \(block/query, "
                                        r"block/value\)"):
    lora.add_adapters(params, lora.LoraConfig(rank=2, alpha=2.0, targets="block"),
                      jax.random.PRNGKey(0))
  adapted = lora.add_adapters(params, lora.LoraConfig(rank=2, alpha=2.0, targets="query|head"),
                              jax.random.PRNGKey(0))
  assert adapted["block"]["lora_a"].shape == (4, 2) and adapted["head"]["lora_b"].shape == (2, 2)
