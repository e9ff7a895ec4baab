"""deepflow's Conv against flax's nn.Conv (lax's convolution): same values, same derivatives,
and the shifted-sum forward used exactly where it applies."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from deepflow.models import conv

# (input shape, kernel size, nn.Conv's other arguments): few input channels, unit strides, no
# dilation or groups, where the shifted sum applies
APPLIES = [((3, 8, 8, 1), (3, 3), dict(padding="SAME")),
           ((2, 9, 7, 3), (5, 3), dict(padding="VALID")),
           ((2, 6, 6, 4), (3, 3), dict(padding=((1, 0), (2, 1)))),
           ((2, 10, 2), (3,), dict(padding="SAME"))]              # one spatial axis
# where it does not: lax's convolution as it is
FALLS_BACK = [((2, 8, 8, 5), (3, 3), dict(padding="SAME")),        # more than FEW_CHANNELS
              ((2, 8, 8, 1), (3, 3), dict(strides=2)),
              ((2, 8, 8, 2), (3, 3), dict(kernel_dilation=2)),
              ((2, 8, 8, 4), (3, 3), dict(feature_group_count=2)),
              ((2, 8, 8, 1), (3, 3), dict(precision=lax.Precision.HIGHEST))]


def _problem(shape, kernel, kwargs):
  x = jax.random.normal(jax.random.key(0), shape)
  ours = conv.Conv(6, kernel, **kwargs)
  ref = nn.Conv(6, kernel, **kwargs)
  variables = ref.init(jax.random.key(1), x)
  cotangent = jax.random.normal(jax.random.key(2), ref.apply(variables, x).shape)
  return x, ours, ref, variables, cotangent


@pytest.mark.parametrize("case", APPLIES + FALLS_BACK)
def test_values_and_gradients_equal_flax(case):
  x, ours, ref, variables, cotangent = _problem(*case)

  def value_and_grads(module):
    y, vjp = jax.vjp(jax.jit(module.apply), variables, x)
    return y, vjp(cotangent)
  (y, grads), (y_ref, grads_ref) = value_and_grads(ours), value_and_grads(ref)
  # The value sums the window in another order, and XLA may sum the kernel gradient (lax's
  # convolution of the same cotangent) in another order in another program: equal up to float
  # rounding.
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads,
               grads_ref)


def test_forward_mode_and_per_example_gradients_equal_flax():
  x, ours, ref, variables, _ = _problem(*APPLIES[0])
  tangent = jax.random.normal(jax.random.key(3), x.shape)
  for args in [(x,), (tangent,)]:
    np.testing.assert_allclose(jax.jvp(lambda e: ours.apply(variables, e), (x,), args)[1],
                               jax.jvp(lambda e: ref.apply(variables, e), (x,), args)[1],
                               rtol=1e-6, atol=1e-6)

  def per_example(module):  # DP-SGD's vmapped per-example gradients
    loss = lambda v, e: jnp.sum(module.apply(v, e[None]) ** 2)  # noqa: E731
    return jax.vmap(jax.grad(loss), (None, 0))(variables, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               per_example(ours), per_example(ref))


@pytest.mark.parametrize("case,shifted", [(c, True) for c in APPLIES]
                         + [(c, False) for c in FALLS_BACK])
def test_the_shifted_sum_runs_on_cpu_only_where_it_applies(case, shifted):
  x, ours, _, variables, _ = _problem(*case)
  forward = jax.jit(ours.apply).trace(variables, x)
  cpu = forward.lower(lowering_platforms=("cpu",)).as_text()
  tpu = forward.lower(lowering_platforms=("tpu",)).as_text()
  assert ("convolution" not in cpu) == shifted
  assert "convolution" in tpu


def test_bfloat16_is_summed_in_float32_and_rounded_once_like_lax():
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 4))
  kernel = jax.random.normal(jax.random.key(1), (5, 5, 4, 8))
  numbers = ("NHWC", "HWIO", "NHWC")
  exact = lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=numbers,
                                   precision=lax.Precision.HIGHEST)
  low = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)

  def error(fn):
    y = jax.jit(fn)(*low)
    assert y.dtype == jnp.bfloat16
    return float(jnp.max(jnp.abs(y.astype(jnp.float32) - exact)))
  ours = error(lambda a, b: conv.conv_general_dilated(a, b, (1, 1), "SAME",
                                                      dimension_numbers=numbers))
  theirs = error(lambda a, b: lax.conv_general_dilated(a, b, (1, 1), "SAME",
                                                       dimension_numbers=numbers))
  # Summed in bfloat16 the error was 1.21 against lax's 0.14.
  assert ours <= 1.5 * theirs, (ours, theirs)
