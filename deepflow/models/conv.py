"""Convolution as one matrix product over patches, for layers with few input channels.

XLA's CPU convolution is slow when the input has few channels (an image's first layer). There,
gathering each output position's window into a row (``prod(window) * in_channels`` wide, one
strided slice per window offset) and multiplying by the kernel reshaped to a matrix is faster,
forward and backward; ``benchmarks/vs_pytorch.py``'s digits CNN step uses it. Measured on the
2-core CPU, a 3x3 conv's forward + backward: 3.4x faster with 1 input channel, 2-3x with 3,
1.2x with 8, 0.8x with 16, hence ``MAX_PATCH_CHANNELS``.

``conv_general_dilated`` has ``lax.conv_general_dilated``'s signature, so it plugs into
``nn.Conv(..., conv_general_dilated=conv_general_dilated)`` (same parameters, same checkpoints)
and hands every case it does not cover (dilation, groups, other layouts, many channels) to
``lax.conv_general_dilated``.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from jax import lax

MAX_PATCH_CHANNELS = 8


def _channels_last(lhs, rhs, dimension_numbers) -> bool:
  spatial = "".join("HWDXYZ"[:lhs.ndim - 2])
  expected = lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                        (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
  return dimension_numbers == expected


def _patch_conv(lhs, rhs, strides, pads, precision):
  window, (in_channels, out_channels) = rhs.shape[:-2], rhs.shape[-2:]
  lhs = jnp.pad(lhs, [(0, 0), *pads, (0, 0)])
  out = [(n - k) // s + 1 for n, k, s in zip(lhs.shape[1:-1], window, strides)]
  patches = jnp.concatenate([
      lax.slice(lhs, (0, *offset, 0),
                (lhs.shape[0], *(o + (n - 1) * s + 1 for o, n, s in zip(offset, out, strides)),
                 in_channels), (1, *strides, 1))
      for offset in itertools.product(*(range(k) for k in window))], axis=-1)
  # Row-major window offsets, then channels: the order of rhs reshaped to (window * in, out).
  return jnp.dot(patches, rhs.reshape(-1, out_channels), precision=precision)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, precision=None, **kwargs) -> jax.Array:
  """``lax.conv_general_dilated``, as patches times a matrix when the input is channels-last,
  undilated, ungrouped, with at most ``MAX_PATCH_CHANNELS`` channels."""
  def dense(seq):
    return seq is None or all(d == 1 for d in seq)
  if (rhs.shape[-2] <= MAX_PATCH_CHANNELS and feature_group_count == 1 and not kwargs
      and dense(lhs_dilation) and dense(rhs_dilation)
      and _channels_last(lhs, rhs, dimension_numbers)):
    strides = tuple(window_strides)
    pads = (lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:-2], strides, padding)
            if isinstance(padding, str) else padding)
    return _patch_conv(lhs, rhs, strides, [tuple(p) for p in pads], precision)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                  dimension_numbers, feature_group_count, precision=precision,
                                  **kwargs)
