"""Vision transformer: shapes, pooling, positions, dropout, and the patch-size check."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepflow.models import vit
from deepflow.registry import ConfigError, MODELS

TINY = dict(d_model=16, num_heads=2, num_layers=1, mlp_dim=16)
# rbg keys: their initialisers compile several times faster than threefry's on CPU
KEY = jax.random.key(0, impl="rbg")


@pytest.mark.parametrize("pooling,patch,shape,tokens", [
    ("cls", 2, (8, 8, 1), 17), ("mean", 4, (8, 4, 3), 2)])
def test_shapes_and_positions(pooling, patch, shape, tokens):
  model = MODELS.get("vit")(10, patch_size=patch, pooling=pooling, **TINY)
  x = jnp.ones((3,) + shape)
  variables = jax.eval_shape(model.init, KEY, x)  # shapes only: nothing is compiled
  assert jax.eval_shape(model.apply, variables, x).shape == (3, 10)
  assert variables["params"]["positions"].shape == (tokens, 16)
  assert variables["params"]["patches"]["kernel"].shape == (patch, patch, shape[2], 16)


def test_patch_size_must_divide_image():
  with pytest.raises(ConfigError) as err:
    vit.ViT(10, patch_size=3, **TINY).init(KEY, jnp.ones((1, 8, 8, 1)))
  assert "8x8" in str(err.value) and "patch_size 3" in str(err.value)
  assert "\n" not in str(err.value)


def test_dropout_uses_the_dropout_stream():
  model = vit.ViT(10, patch_size=4, dropout=0.5, **TINY)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 1)), jnp.float32)
  variables = model.init(KEY, x)
  a, b = (model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(s, impl="rbg")})
          for s in (1, 2))
  assert not jnp.allclose(a, b)
  assert jnp.allclose(model.apply(variables, x), model.apply(variables, x))
