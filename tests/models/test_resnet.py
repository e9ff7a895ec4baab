"""ResNet: shapes, batch statistics in train vs eval, stochastic depth, remat, and the compiled
step's fusion of its residual stream on CPU."""
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepflow.models import layers, resnet
from deepflow.train import tuning
from deepflow.registry import ConfigError, MODELS

# rbg keys: their initialisers compile several times faster than threefry's on CPU
KEY = jax.random.key(0, impl="rbg")


@pytest.fixture(scope="module")
def small():
  model = MODELS.get("resnet")(10, stage_sizes=(1, 1), width=8)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 8, 8, 1)), jnp.float32)
  return model, model.init(KEY, x), x


def test_shapes_and_collections(small):
  model, variables, x = small
  assert model.apply(variables, x).shape == (6, 10)
  assert set(variables) == {"params", "batch_stats"}
  assert {"stem_norm", "stage0_block0", "stage1_block0"} <= set(variables["batch_stats"])
  # stage 1 halves the resolution and doubles the width, so it needs a projection shortcut
  assert "shortcut" in variables["params"]["stage1_block0"]
  assert "shortcut" not in variables["params"]["stage0_block0"]


def test_bottleneck_imagenet_stem_and_max_pooling():
  model = resnet.ResNet(3, stage_sizes=(1, 1), width=4, block="bottleneck", stem="imagenet",
                        pooling="max")
  x = jnp.ones((2, 16, 16, 3))
  variables = jax.eval_shape(model.init, KEY, x)  # shapes only: nothing is compiled
  assert jax.eval_shape(model.apply, variables, x).shape == (2, 3)
  assert variables["params"]["stem"]["kernel"].shape == (7, 7, 3, 4)
  assert variables["params"]["head"]["kernel"].shape == (4 * 8, 3)


def test_config_errors():
  x = jnp.ones((1, 8, 8, 1))
  for bad in (dict(stem="huge"), dict(pooling="median"), dict(stochastic_depth=1.0),
              dict(block="wide")):
    with pytest.raises(ConfigError):
      jax.eval_shape(resnet.ResNet(2, stage_sizes=(1,), width=4, **bad).init, KEY, x)


def test_batch_stats_update_in_train_and_are_used_in_eval(small):
  model, variables, x = small
  _, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
  before = jax.tree.leaves(variables["batch_stats"])
  after = jax.tree.leaves(updated["batch_stats"])
  assert all(not np.allclose(a, b) for a, b in zip(before, after))
  # eval: no mutation needed, each example independent of the others in the batch ...
  eval_out = model.apply(variables, x)
  np.testing.assert_allclose(model.apply(variables, x[:2]), eval_out[:2], atol=1e-5)
  # ... and the running statistics (not the batch's) normalise it
  assert not np.allclose(model.apply({**variables, **updated}, x), eval_out, atol=1e-4)
  train_out, _ = model.apply(variables, x[:2], train=True, mutable=["batch_stats"])
  assert not np.allclose(train_out, eval_out[:2], atol=1e-4)


def test_stochastic_depth_drops_whole_branches():
  """With an identity activation a block is x + branch(x): a dropped example returns x
  exactly, a kept one x + branch / (1 - p); at eval the block is the plain one."""
  p = 0.5
  block = resnet.ResidualBlock(8, activation="identity", drop_rate=p)
  plain = block.clone(drop_rate=0.0)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(64, 4, 4, 8)), jnp.float32)
  variables = block.init(KEY, x)
  np.testing.assert_allclose(block.apply(variables, x), plain.apply(variables, x), atol=1e-6)
  out, _ = block.apply(variables, x, True, mutable=["batch_stats"],
                       rngs={"dropout": jax.random.key(3, impl="rbg")})
  ref, _ = plain.apply(variables, x, True, mutable=["batch_stats"])
  dropped = np.all(np.isclose(out, x, atol=1e-6), axis=(1, 2, 3))
  assert 10 < dropped.sum() < 54
  np.testing.assert_allclose(out[~dropped], (x + (ref - x) / (1 - p))[~dropped], atol=1e-4)


def test_remat_recomputes_blocks_without_changing_the_model(small):
  model, variables, x = small
  remat = model.clone(remat=True)
  train = lambda m: lambda p: m.apply({**variables, "params": p}, x, train=True,  # noqa: E731
                                      mutable=["batch_stats"])
  (a, sa), (b, sb) = (train(m)(variables["params"]) for m in (model, remat))
  np.testing.assert_allclose(a, b, atol=1e-5)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-6), sa, sb)
  grad = lambda m: jax.grad(lambda p: train(m)(p)[0].sum())  # noqa: E731
  assert "remat" in str(jax.make_jaxpr(grad(remat))(variables["params"]))


def test_materialize_is_the_identity_in_value_and_gradient():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 3, 4)), jnp.float32)
  g = jnp.asarray(np.random.default_rng(3).normal(size=x.shape), jnp.float32)
  value, vjp = jax.vjp(jax.jit(layers.materialize), x)
  np.testing.assert_array_equal(value, x)
  np.testing.assert_array_equal(vjp(g)[0], g)
  # Only the CPU program carries the barrier; a TPU or GPU program gets x untouched.
  tpu = jax.jit(layers.materialize).trace(x).lower(lowering_platforms=("tpu",)).as_text()
  cpu = jax.jit(layers.materialize).trace(x).lower(lowering_platforms=("cpu",)).as_text()
  assert "dynamic_update_slice" in cpu and "dynamic_update_slice" not in tpu


def _transposed_activation_reads(hlo: str, activation: str, transposed: str) -> list[int]:
  """For every fusion of the compiled program that transposes an activation to ``transposed``
  (the (C, H, W, N) layout a convolution's kernel gradient reads), how many activation-shaped
  arrays it reads."""
  shapes = dict(re.findall(r"\n\s*(%\S+) = (\w+\[[\d,]*\])", hlo))
  reads = []
  for operands in re.findall(r"= " + re.escape(transposed) + r"\{[\d,]*\} fusion\(([^)]*)\)",
                             hlo):
    reads.append(sum(shapes.get(o.split(" ")[-1]) == activation for o in operands.split(", ")))
  return reads


def _kernel_gradient_transpose_reads(materialize) -> list[int]:
  """Activation reads of each kernel gradient's transpose in a ResNet's compiled CPU train
  gradient (deepflow's XLA options), with ``materialize`` at the convolutions' inputs."""
  model = resnet.ResNet(3, stage_sizes=(3,), width=8)  # > FEW_CHANNELS: lax's convolutions
  x = jnp.ones((2, 8, 8, 1))
  variables = model.init(KEY, x)

  def loss(params):
    y, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return jnp.sum(y)
  with mock.patch.object(resnet, "materialize", materialize):
    hlo = jax.jit(jax.grad(loss)).lower(variables["params"]).compile(
        compiler_options=tuning.PLATFORM_DEFAULTS["cpu"]).as_text()
  return _transposed_activation_reads(hlo, "f32[2,8,8,8]", "f32[8,8,8,2]")


def test_the_residual_stream_is_not_recomputed_inside_kernel_gradients():
  # Without materialize, XLA:CPU fused each block's whole residual chain (the batch norms, adds
  # and ReLUs of every earlier block) into the transpose in front of a kernel gradient, reading
  # one more activation per block with strided loads: ResNet-20's step was 1.3x slower.
  reads = _kernel_gradient_transpose_reads(layers.materialize)
  assert len(reads) >= 6 and set(reads) == {1}, reads
  assert max(_kernel_gradient_transpose_reads(lambda x: x)) > 2  # the chain, without it
