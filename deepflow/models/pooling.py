"""Max and average pooling, equal in value and gradient to ``nn.max_pool`` / ``nn.avg_pool``.

Flax lowers pooling to XLA's ``reduce_window``, and the gradient of a max pool to
``select_and_scatter``. On CPU both are slow next to plain reshapes, slices and elementwise
maxima: ``benchmarks/vs_pytorch.py`` measured the digits CNN's whole train step faster with
these. The two formulations:

* window == stride (non-overlapping, the common case): pad, reshape each spatial axis ``H`` into
  ``(H / k, k)`` and reduce over the ``k`` axes;
* the general case: the maximum (or sum) of the ``prod(window)`` strided slices of the padded
  input, one per offset inside the window.

The max pool's gradient goes, like ``select_and_scatter``'s, to the first maximum of each window
in row-major window order (``jnp.max``'s own gradient would split it between tied maxima, e.g.
the zeros a ReLU leaves), so gradients match flax exactly, ties included. For window == stride
each window's first maximal offset is picked by a chain of elementwise selects over the window's
offsets, and each input element then takes the output gradient or 0. (Measured on the digits
CNN: one masked scatter per window offset, which the general case still uses, made the whole
train step 1.3x slower; a min-reduce over the window axes to find the offset made the first
pool's forward and backward 2.7x slower at batch 1024, as XLA:CPU reduces over non-minor axes
poorly.) Average pooling counts padded positions in the divisor, as flax's default
``count_include_pad=True`` does.

Inputs are ``(batch, *spatial, features)`` like flax's; ``padding`` is ``'VALID'``, ``'SAME'`` or
one ``(low, high)`` pair per spatial axis.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Padding = str | Sequence[tuple[int, int]]


def _pads(shape: tuple[int, ...], window: tuple[int, ...], strides: tuple[int, ...],
          padding: Padding) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(shape, window, strides, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _out_sizes(padded: tuple[int, ...], window, strides) -> tuple[int, ...]:
  return tuple((p - k) // s + 1 for p, k, s in zip(padded, window, strides))


def _pad(x: jax.Array, pads, value: float) -> jax.Array:
  if not any(lo or hi for lo, hi in pads):
    return x
  return lax.pad(x, jnp.array(value, x.dtype), [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads),
                                                (0, 0, 0)])


def _window_slices(xp: jax.Array, window, strides, out):
  """The padded input's strided slice for every offset in the window, in row-major order."""
  for offset in itertools.product(*(range(k) for k in window)):
    start = (0, *offset, 0)
    limit = (xp.shape[0], *(o + (n - 1) * s + 1 for o, n, s in zip(offset, out, strides)),
             xp.shape[-1])
    yield offset, lax.slice(xp, start, limit, (1, *strides, 1))


def _blocks(xp: jax.Array, window, out) -> jax.Array:
  """window == stride: (B, n1*k1, ..., C) cropped and reshaped to (B, n1, k1, n2, k2, ..., C)."""
  xp = xp[(slice(None), *(slice(0, n * k) for n, k in zip(out, window)))]
  return xp.reshape(xp.shape[0], *itertools.chain(*zip(out, window)), xp.shape[-1])


def _reduce(xp: jax.Array, window, strides, out, fn) -> jax.Array:
  """``fn`` (jnp.max or jnp.sum) over each window of the padded input."""
  if tuple(window) == tuple(strides):
    return fn(_blocks(xp, window, out), axis=tuple(range(2, 2 * len(window) + 1, 2)))
  combine = jnp.maximum if fn is jnp.max else jnp.add
  return functools.reduce(combine, (s for _, s in _window_slices(xp, window, strides, out)))


def _spec(x: jax.Array, window, strides, padding):
  window = tuple(window)
  strides = tuple(strides) if strides is not None else (1,) * len(window)
  if x.ndim != len(window) + 2:
    raise ValueError(f"pooling expects (batch, *spatial, features) inputs with "
                     f"{len(window)} spatial axes, got shape {x.shape}")
  pads = _pads(x.shape[1:-1], window, strides, padding)
  padded = tuple(n + lo + hi for n, (lo, hi) in zip(x.shape[1:-1], pads))
  return window, strides, pads, _out_sizes(padded, window, strides)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x, window, strides, pads, out):
  return _reduce(_pad(x, pads, -jnp.inf), window, strides, out, jnp.max)


def _max_pool_fwd(x, window, strides, pads, out):
  y = _max_pool(x, window, strides, pads, out)
  return y, (x, y)


def _first_max_blocks(xp, y, g, window, out):
  """window == stride: the gradient in one pass over the input, no per-offset scatter. Each
  window's first maximal offset (row-major) comes from selects over its offsets, last to first;
  every input element takes ``g`` if it sits at that offset, else 0."""
  xb = _blocks(xp, window, out)  # (B, n1, k1, n2, k2, ..., C)
  axes = tuple(range(2, 2 * len(window) + 1, 2))
  offsets = list(itertools.product(*(range(k) for k in window)))

  def element(offset):  # each window's element at ``offset``, shaped like y
    index = [slice(None)] * xb.ndim
    for axis, o in zip(axes, offset):
      index[axis] = o
    return xb[tuple(index)]

  first = jnp.full(y.shape, len(offsets) - 1, jnp.int32)
  for n in range(len(offsets) - 2, -1, -1):
    first = jnp.where(element(offsets[n]) == y, n, first)
  position = sum(lax.broadcasted_iota(jnp.int32, xb.shape, axis) * math.prod(window[i + 1:])
                 for i, axis in enumerate(axes))
  spread = lambda a: jnp.expand_dims(a, axes)  # noqa: E731  (B, n1, 1, n2, 1, ..., C)
  dxb = jnp.where(position == spread(first), spread(g), jnp.zeros((), g.dtype))
  dxp = dxb.reshape(xb.shape[0], *(n * k for n, k in zip(out, window)), xb.shape[-1])
  return _pad(dxp, [(0, p - n * k) for p, n, k in zip(xp.shape[1:-1], out, window)], 0.0)


def _first_max_slices(xp, y, g, window, strides, out):
  """The general case: per window offset, the strided slice's elements that are the first
  maximum so far take ``g``, scattered back by a pad with interior (stride - 1) zeros."""
  taken = jnp.zeros(y.shape, bool)
  dxp = jnp.zeros(xp.shape, g.dtype)
  for offset, candidate in _window_slices(xp, window, strides, out):
    chosen = (candidate == y) & ~taken
    taken = taken | chosen
    config = [(0, 0, 0), *((o, p - o - (n - 1) * s - 1, s - 1)
                           for o, p, n, s in zip(offset, xp.shape[1:-1], out, strides)),
              (0, 0, 0)]
    dxp = dxp + lax.pad(jnp.where(chosen, g, 0), jnp.array(0, g.dtype), config)
  return dxp


def _max_pool_bwd(window, strides, pads, out, residuals, g):
  # The gradient goes to the first maximum of each window in row-major window order.
  x, y = residuals
  xp = _pad(x, pads, -jnp.inf)
  if tuple(window) == tuple(strides):
    dxp = _first_max_blocks(xp, y, g, window, out)
  else:
    dxp = _first_max_slices(xp, y, g, window, strides, out)
  crop = (slice(None), *(slice(lo, lo + n) for (lo, _), n in zip(pads, x.shape[1:-1])))
  return (dxp[crop],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int] | None = None,
             padding: Padding = "VALID") -> jax.Array:
  """``nn.max_pool(x, window, strides, padding)``, faster on CPU (see the module docstring)."""
  window, strides, pads, out = _spec(x, window, strides, padding)
  return _max_pool(x, window, strides, pads, out)


def avg_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int] | None = None,
             padding: Padding = "VALID") -> jax.Array:
  """``nn.avg_pool(x, window, strides, padding)`` (padding counted in the divisor)."""
  window, strides, pads, out = _spec(x, window, strides, padding)
  return _reduce(_pad(x, pads, 0.0), window, strides, out, jnp.sum) / math.prod(window)
