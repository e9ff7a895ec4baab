"""Convolution as patches times a matrix against lax's convolution (through flax's nn.Conv)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepflow.models import conv

CASES = [((4, 8, 8, 1), 32, (3, 3), (1, 1), "SAME"),     # the digits CNN's first layer
         ((4, 9, 9, 3), 8, (3, 3), (2, 2), "SAME"),      # strided, odd size
         ((4, 8, 8, 3), 8, (5, 5), (1, 1), "VALID"),
         ((4, 7, 7, 3), 4, (7, 7), (2, 2), [(3, 3), (3, 3)]),  # the ImageNet stem's shape
         ((4, 10, 2), 4, (3,), (1,), "SAME"),            # one spatial axis
         ((4, 8, 8, 16), 8, (3, 3), (1, 1), "SAME")]     # many channels: lax's own path


@pytest.mark.parametrize("shape,features,window,strides,padding", CASES)
def test_values_and_gradients_match_lax_convolution(shape, features, window, strides, padding):
  x = jax.random.normal(jax.random.key(0), shape)
  ref = nn.Conv(features, window, strides, padding=padding)
  ours = nn.Conv(features, window, strides, padding=padding,
                 conv_general_dilated=conv.conv_general_dilated)
  variables = ref.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(
      jnp.shape, variables)  # same parameters: checkpoints carry over

  def loss(module):
    return lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))
  np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x), rtol=1e-5,
                             atol=1e-5)
  got = jax.grad(loss(ours), argnums=(0, 1))(variables, x)
  expected = jax.grad(loss(ref), argnums=(0, 1))(variables, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    # Sums over every output position, in another order: equal to float rounding.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_dilated_or_grouped_convolutions_are_lax_convolutions():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  for kwargs in (dict(kernel_dilation=(2, 2)), dict(feature_group_count=2)):
    ref = nn.Conv(4, (3, 3), **kwargs)
    ours = nn.Conv(4, (3, 3), conv_general_dilated=conv.conv_general_dilated, **kwargs)
    variables = ref.init(jax.random.key(1), x)
    np.testing.assert_array_equal(ours.apply(variables, x), ref.apply(variables, x))
