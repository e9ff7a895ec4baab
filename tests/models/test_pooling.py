"""deepflow's pooling against flax's reduce_window pooling: same values, same gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepflow.models import pooling

# (input shape, window, strides, padding); NON_OVERLAPPING is window == stride (the reshape
# formulation, its gradient by the first maximal position per window), OVERLAPPING the general
# one (strided slices).
NON_OVERLAPPING = [((2, 8, 8, 3), (2, 2), (2, 2), "SAME"),
                   ((2, 7, 7, 3), (2, 2), (2, 2), "SAME"),     # SAME pads one row and column
                   ((2, 8, 8, 3), (3, 3), (3, 3), "SAME"),     # 9 positions; pads (0, 1)
                   ((2, 7, 9, 3), (3, 3), (3, 3), "VALID"),    # VALID drops the remainder
                   ((2, 10, 3), (2,), (2,), "VALID")]          # one spatial axis
OVERLAPPING = [((2, 9, 9, 3), (3, 3), (2, 2), "SAME"),          # the ImageNet ResNet stem's pool
               ((2, 8, 8, 3), (3, 3), (1, 1), "VALID"),
               ((2, 8, 8, 3), (2, 3), (1, 2), ((1, 0), (2, 1)))]
POOLS = [(pooling.max_pool, nn.max_pool), (pooling.avg_pool, nn.avg_pool)]


def _inputs(shape, ties: bool):
  x = jax.random.normal(jax.random.key(0), shape)
  # ReLU then rounding leaves many windows with tied maxima (zeros and small integers): which
  # tied element receives the max pool's gradient is where a naive jnp.max formulation differs.
  return jnp.round(2 * jax.nn.relu(x)) if ties else x


def _value_and_grad(pool, x, window, strides, padding, cotangent):
  def f(x):
    return jnp.sum(pool(x, window, strides, padding) * cotangent)
  return pool(x, window, strides, padding), jax.grad(f)(x)


def _compare(ours, ref, shape, window, strides, padding, ties, rtol):
  x = _inputs(shape, ties)
  expected = ref(x, window, strides, padding)
  cotangent = jax.random.normal(jax.random.key(1), expected.shape)
  value, grad = _value_and_grad(ours, x, window, strides, padding, cotangent)
  ref_value, ref_grad = _value_and_grad(ref, x, window, strides, padding, cotangent)
  assert value.shape == ref_value.shape
  np.testing.assert_allclose(value, ref_value, rtol=rtol, atol=rtol)
  np.testing.assert_allclose(grad, ref_grad, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("ours,ref", POOLS, ids=["max", "avg"])
@pytest.mark.parametrize("shape,window,strides,padding", NON_OVERLAPPING)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_non_overlapping_pooling_matches_flax_exactly(ours, ref, shape, window, strides, padding,
                                                      ties):
  # Exact for max (a choice, not arithmetic); an average may round differently in its last bit
  # when the two sum a window in different orders.
  _compare(ours, ref, shape, window, strides, padding, ties, 0.0 if ours is pooling.max_pool
           else 1e-6)


@pytest.mark.parametrize("ours,ref", POOLS, ids=["max", "avg"])
@pytest.mark.parametrize("shape,window,strides,padding", OVERLAPPING)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_overlapping_pooling_matches_flax(ours, ref, shape, window, strides, padding, ties):
  # An element in several windows collects several gradient terms, summed in another order
  # than select_and_scatter sums them: equal up to float rounding.
  _compare(ours, ref, shape, window, strides, padding, ties, 1e-6)


def test_max_pool_gradient_goes_to_the_first_tied_maximum():
  x = jnp.zeros((1, 2, 2, 1))  # one window, all four elements tied
  grad = jax.grad(lambda x: jnp.sum(pooling.max_pool(x, (2, 2), (2, 2))))(x)
  np.testing.assert_array_equal(grad[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])


def test_per_example_gradients_under_vmap_match_flax():
  # DP-SGD differentiates the model per example inside vmap.
  x = _inputs((4, 6, 6, 2), ties=True)

  def per_example(pool):
    return jax.vmap(jax.grad(lambda e: jnp.sum(pool(e[None], (2, 2), (2, 2), "SAME") ** 2)))(x)
  np.testing.assert_array_equal(per_example(pooling.max_pool), per_example(nn.max_pool))


def test_rejects_inputs_without_batch_and_feature_axes():
  with pytest.raises(ValueError, match="spatial axes"):
    pooling.max_pool(jnp.zeros((8, 8)), (2, 2), (2, 2))
