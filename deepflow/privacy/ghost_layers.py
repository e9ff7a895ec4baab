"""Per-example gradient norms and clipped gradient sums of covered layers from what the layer
kept of its call (``spec.capture``: its input ``x``, or what the gradient needs of it) and what
came back (the gradient ``g`` of the loss w.r.t. its output), without forming a per-example
gradient where that is cheaper ("ghost clipping", Li et al., 2022; the clipped sum straight from
``x`` and ``g`` is Bu et al.'s 2023 "book-keeping").

A layer's spec is read off the Flax module when it is called (``layer_spec``), or is None for a
module or a configuration this file does not cover. Every function here takes what all of a
module's calls in one forward pass kept and their output gradients, each with a leading example
axis ``N`` (a module applied twice, e.g. shared weights, contributes the sum of both calls'
gradients).

For Dense (and DenseGeneral contracting trailing axes: attention's projections, read as the
matrix of flattened input and output features) and Conv the per-example kernel gradient is
``A_i^T G_i`` with ``A_i`` (T x D) the example's input rows (the input vectors of a Dense layer
at every position, the patches of a convolution) and ``G_i`` (T x C) the output gradients at the
same T positions. Its squared norm is either ``<A_i A_i^T, G_i G_i^T>`` (two T x T Gram
matrices: T^2 (D + C) work) or the materialized ``A_i^T G_i`` (T D C work), whichever costs
less; for a convolution called once neither takes the Gram of the patches
(``Conv.kernel_sq_norms``: it is summed from the padded input's own Gram, or the product is taken
over the strided slices stacked offset-major). The bias gradient is ``sum_t G_i``.
The clipped sum ``sum_i c_i A_i^T G_i`` is one matmul for Dense, and for Conv the kernel gradient
of the convolution itself with output gradients ``c_i G_i``.
An embedding's per-example gradient adds ``g_t`` to row ``id_t``, so its squared norm is the sum of
``<g_t, g_s>`` over position pairs with the same token, or (large T x C, CPU) the sum over tokens
of their summed ``g_t`` squared (``token_norms``); learned positions are an embedding of the
positions. LayerNorm and RMSNorm keep the normalized input ``x_hat``, and a class token keeps
nothing: their per-example gradients (``sum_t g_t * x_hat_t`` and ``sum_t g_t``; the output
gradient at the token's position) are feature-sized and formed directly.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from deepflow.models import conv, layers
from deepflow.privacy import token_norms

Array = jax.Array


def _first(args, kwargs) -> Array:
  """What a layer of one input keeps of its call: that input."""
  return args[0]


@dataclasses.dataclass(frozen=True)
class Dense:
  """``nn.Dense``, and ``nn.DenseGeneral`` contracting the input's last ``in_axes`` axes into
  ``out_axes`` output axes (attention's projections): kernel (*D, *C) read as the matrix
  (prod D, prod C), optional bias (*C,)."""
  use_bias: bool
  in_axes: int = 1
  out_axes: int = 1
  capture = staticmethod(_first)

  @property
  def param_names(self) -> tuple[str, ...]:
    return ("kernel", "bias") if self.use_bias else ("kernel",)

  def rows(self, x: Array) -> Array:
    return x.reshape(x.shape[0], -1, math.prod(x.shape[x.ndim - self.in_axes:]))


@dataclasses.dataclass(frozen=True)
class Conv:
  """``nn.Conv`` without groups, masks, input dilation or a custom convolution other than
  deepflow's own (``models.conv``: lax's convolution, computed another way): kernel
  (*window, D_in, C), optional bias (C,). Rows are the input's patches, features ordered
  (*window, D_in) like the kernel's leading axes."""
  use_bias: bool
  window: tuple[int, ...]
  strides: tuple[int, ...]
  padding: Any  # 'SAME', 'VALID' or explicit (low, high) pairs, as lax takes them
  dilation: tuple[int, ...]
  out_axes = 1
  capture = staticmethod(_first)

  @property
  def param_names(self) -> tuple[str, ...]:
    return ("kernel", "bias") if self.use_bias else ("kernel",)

  def _images(self, x: Array) -> Array:
    return x.reshape(-1, *x.shape[-(len(self.window) + 1):])  # every example's, one batch

  def _windows(self, x: Array) -> tuple[list[Array], Array]:
    """(one strided slice of the padded images per window offset, in the kernel's order; the
    padded images): memory moves only (XLA's ``conv_general_dilated_patches`` is a convolution
    with an identity kernel, D_in * prod(window) times the work of the layer itself)."""
    images = self._images(x)
    reach = [(k - 1) * d + 1 for k, d in zip(self.window, self.dilation)]
    pads = (lax.padtype_to_pads(images.shape[1:-1], reach, self.strides, self.padding)
            if isinstance(self.padding, str) else self.padding)
    images = jnp.pad(images, [(0, 0), *pads, (0, 0)])
    out = [(n - r) // s + 1 for n, r, s in zip(images.shape[1:-1], reach, self.strides)]
    slices = []
    for start in self._starts():
      slices.append(lax.slice(images, (0, *start, 0),
                              (images.shape[0], *self._ends(start, out), images.shape[-1]),
                              (1, *self.strides, 1)))
    return slices, images

  def _starts(self) -> list[list[int]]:
    return [[o * d for o, d in zip(offset, self.dilation)]
            for offset in itertools.product(*map(range, self.window))]

  def _ends(self, start: list[int], out: list[int]) -> list[int]:
    """Where a strided slice from ``start`` that yields ``out`` positions ends."""
    return [b + (m - 1) * s + 1 for b, m, s in zip(start, out, self.strides)]

  def rows(self, x: Array) -> Array:
    """Patches, features (*window, D_in)."""
    patches = jnp.concatenate(self._windows(x)[0], axis=-1)
    return patches.reshape(x.shape[0], -1, patches.shape[-1])

  def kernel_sq_norms(self, x: Array, g: Array, form: str | None = None) -> Array:
    """(N,) squared norms of each example's kernel gradient for one call (input ``x``, output
    gradient ``g``), in the cheaper ``form`` by multiply-adds unless one is named:

    * ``'direct'``: the per-example gradient, one (D_in x T) @ (T x C) product per window
      offset, T * prod(window) * D_in * C; the offsets stacked on their own axis (an
      interleaved patch matrix costs XLA more to build than the product itself).
    * ``'gram'``: ``<A A^T, G G^T>`` with the patches' Gram ``A A^T`` summed from the padded
      input's own Gram, ``(A A^T)[t, s] = sum_o K[t + o, s + o]``: P^2 * D_in + T^2 * C for P
      padded input positions, against T^2 * prod(window) * D_in from the patches.
    """
    slices, padded = self._windows(x)
    n, c, d_in = x.shape[0], g.shape[-1], x.shape[-1]
    images, out = padded.shape[0] // n, slices[0].shape[1:-1]  # images per example
    g = g.reshape(n, images, math.prod(out), c).astype(jnp.float32)
    t, p = images * math.prod(out), padded.size // (n * d_in)
    if form is None:
      form = "gram" if p * p * d_in + t * t * c < t * len(slices) * d_in * c else "direct"
    if form == "direct":
      windows = jnp.stack(slices, axis=1).reshape(n, images, len(slices), -1, d_in)
      per_example = jnp.einsum("nmotd,nmtc->nodc", windows.astype(jnp.float32), g)
      return jnp.sum(jnp.square(per_example), axis=(1, 2, 3))
    flat = padded.reshape(n, p, d_in).astype(jnp.float32)
    spatial = padded.shape[1:-1]
    gram = jnp.einsum("npd,nqd->npq", flat, flat).reshape(n, images, *spatial, images, *spatial)
    ends = lambda start: (images, *self._ends(start, out))  # noqa: E731
    patches_gram = sum(lax.slice(gram, (0, 0, *start, 0, *start), (n, *ends(start), *ends(start)),
                                 (1, 1, *self.strides, 1, *self.strides))
                       for start in self._starts())
    g = g.reshape(n, t, c)
    return jnp.einsum("nts,nts->n", patches_gram.reshape(n, t, t), g @ jnp.swapaxes(g, 1, 2))

  def kernel_sum(self, x: Array, g: Array, kernel: Array) -> Array:
    """``sum_i x_i^T g_i`` as the kernel gradient of the convolution itself (XLA's
    backward-filter convolution: several times faster on CPU than a matmul of the patches)."""
    spatial = len(self.window)
    dims = "DHW"[-spatial:]

    def conv(w):
      return lax.conv_general_dilated(
          self._images(x), w, self.strides, self.padding, rhs_dilation=self.dilation,
          dimension_numbers=(f"N{dims}C", f"{dims}IO", f"N{dims}C"),
          precision=lax.Precision.HIGHEST)
    out, pullback = jax.vjp(conv, kernel)
    return pullback(g.reshape(out.shape))[0]


@dataclasses.dataclass(frozen=True)
class Embed:
  """``nn.Embed`` (``__call__`` only: ``attend`` reads the table another way): embedding (V, C)
  whose rows ``capture`` names. A negative id reads row ``V + id``, as ``jnp.take`` does
  (``num_embeddings`` V; 0 where ids are never negative)."""
  param: str = "embedding"
  num_embeddings: int = 0
  capture = staticmethod(_first)

  @property
  def param_names(self) -> tuple[str, ...]:
    return (self.param,)


@dataclasses.dataclass(frozen=True)
class Positions(Embed):
  """deepflow's learned ``PositionalEmbedding``: table (max_len, C) whose rows ``offset + t``
  (clamped into the table, as ``lax.dynamic_slice`` does) or the given ``positions`` are added
  to the input; an embedding of the positions (``num_embeddings`` is ``max_len``)."""

  def capture(self, args, kwargs) -> Array:
    call = {**dict(zip(("x", "offset", "positions"), args)), **kwargs}
    x, positions = call["x"], call.get("positions")
    if positions is not None:
      return positions
    length = x.shape[-2]
    start = jnp.clip(call.get("offset", 0), 0, self.num_embeddings - length)
    return jnp.broadcast_to(start + jnp.arange(length), x.shape[:-1])


@dataclasses.dataclass(frozen=True)
class Norm:
  """``nn.LayerNorm`` (``centered``) and ``nn.RMSNorm`` over the last axis: scale (C,) and bias
  (C,) as used. It keeps the normalized input ``x_hat``; an example's scale gradient is
  ``sum_t g_t * x_hat_t`` and its bias gradient ``sum_t g_t``, small enough to form directly."""
  centered: bool
  epsilon: float
  fast_variance: bool
  use_scale: bool
  use_bias: bool

  @property
  def param_names(self) -> tuple[str, ...]:
    return ("scale",) * self.use_scale + ("bias",) * self.use_bias

  def capture(self, args, kwargs) -> Array:
    """The normalized input in float32, as Flax computes it (statistics in float32)."""
    x = args[0].astype(jnp.float32)
    mean = jnp.mean(x, -1, keepdims=True) if self.centered else 0.0
    if self.fast_variance:
      var = jnp.maximum(jnp.mean(jnp.square(x), -1, keepdims=True) - jnp.square(mean), 0.0)
    else:
      var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + self.epsilon)

  def example_grads(self, captured, grads) -> dict[str, Array]:
    x_hat, g = _vectors(captured), _vectors(grads)
    out = {"scale": jnp.sum(g * x_hat, axis=1)} if self.use_scale else {}
    return {**out, "bias": jnp.sum(g, axis=1)} if self.use_bias else out


@dataclasses.dataclass(frozen=True)
class Prepended:
  """deepflow's ``ClassToken``: a learned (1, 1, C) token put before the input's positions; an
  example's gradient is the output gradient at position 0."""
  param: str

  @property
  def param_names(self) -> tuple[str, ...]:
    return (self.param,)

  def capture(self, args, kwargs) -> None:
    return None

  def example_grads(self, captured, grads) -> dict[str, Array]:
    first = sum(jnp.sum(g.reshape(g.shape[0], -1, *g.shape[-2:])[:, :, 0], axis=1)
                for g in _f32(grads))
    return {self.param: first}


def _tuple(value: Any, n: int) -> tuple[int, ...]:
  value = 1 if value is None else value
  return (value,) * n if isinstance(value, int) else tuple(value)


def _conv_spec(module: nn.Conv) -> Conv | None:
  window = _tuple(module.kernel_size, 1)
  n = len(window)
  padding = nn.linear.canonicalize_padding(module.padding, n)
  if (module.feature_group_count != 1 or module.mask is not None or n > 3
      or module.conv_general_dilated not in (None, conv.conv_general_dilated)
      or module.conv_general_dilated_cls is not None
      or set(_tuple(module.input_dilation, n)) != {1}
      or (isinstance(padding, str) and padding not in ("SAME", "VALID"))):
    return None
  padding = padding if isinstance(padding, str) else tuple(map(tuple, padding))
  return Conv(module.use_bias, window, _tuple(module.strides, n), padding,
              _tuple(module.kernel_dilation, n))


def _dense_general_spec(module: nn.DenseGeneral) -> Dense | None:
  """Contracting trailing axes in order, no batch axes: a Dense over flattened features."""
  axis = _tuple(module.axis, 1)
  if tuple(module.batch_dims) or axis != tuple(range(-len(axis), 0)):
    return None
  return Dense(module.use_bias, len(axis), len(_tuple(module.features, 1)))


def _norm_spec(module: nn.LayerNorm | nn.RMSNorm) -> Norm | None:
  centered = type(module) is nn.LayerNorm
  use_bias = centered and module.use_bias
  if (_tuple(module.reduction_axes, 1) != (-1,) or _tuple(module.feature_axes, 1) != (-1,)
      or module.axis_name is not None or not module.force_float32_reductions
      or not (module.use_scale or use_bias)):
    return None
  return Norm(centered, module.epsilon, module.use_fast_variance, module.use_scale, use_bias)


def layer_spec(module: nn.Module, method: str, kwargs: dict) -> Any:
  """The spec of a covered layer's call (exact classes: a subclass may compute otherwise) with
  keyword arguments ``kwargs``, else None."""
  if method != "__call__":
    return None
  kind = type(module)
  if kind in (nn.Dense, nn.DenseGeneral) and (module.dot_general is not None
                                              or module.dot_general_cls is not None):
    return None
  if kind is nn.Dense:
    return Dense(module.use_bias)
  if kind is nn.DenseGeneral:
    return _dense_general_spec(module)
  if kind is nn.Conv:
    return _conv_spec(module)
  if kind is nn.Embed and module.num_embeddings > 1:
    return Embed(num_embeddings=module.num_embeddings)
  if kind in (nn.LayerNorm, nn.RMSNorm) and kwargs.get("mask") is None:
    return _norm_spec(module)
  if kind is layers.PositionalEmbedding and module.kind == "learned":
    return Positions(module.param_name, num_embeddings=module.max_len)
  if kind is layers.ClassToken:
    return Prepended(module.param_name)
  return None


# -- norms and sums over a module's calls ----------------------------------------------------------

def _f32(arrays: Sequence[Array]) -> list[Array]:
  return [a.astype(jnp.float32) for a in arrays]


def _out_rows(spec: Dense | Conv, g: Array) -> Array:
  return g.reshape(g.shape[0], -1, math.prod(g.shape[g.ndim - spec.out_axes:]))


def _matrices(spec: Dense | Conv, inputs, grads) -> tuple[Array, Array]:
  """(A, G): every call's input rows and output gradients, positions of all calls stacked."""
  a = jnp.concatenate([spec.rows(x) for x in _f32(inputs)], axis=1)
  g = jnp.concatenate([_out_rows(spec, gi) for gi in _f32(grads)], axis=1)
  return a, g


def _kernel_sq_norms(a: Array, g: Array) -> Array:
  _, t, d = a.shape
  c = g.shape[-1]
  if t * (d + c) < d * c:  # two T x T Gram matrices cost less than the per-example gradient
    return jnp.einsum("nts,nts->n", a @ jnp.swapaxes(a, 1, 2), g @ jnp.swapaxes(g, 1, 2))
  return jnp.sum(jnp.square(jnp.einsum("ntd,ntc->ndc", a, g)), axis=(1, 2))


def _vectors(arrays: Sequence[Array]) -> Array:
  """(N, T, C): every call's vectors along the last axis in float32, positions stacked."""
  return jnp.concatenate([a.reshape(a.shape[0], -1, a.shape[-1]) for a in _f32(arrays)], axis=1)


def _tokens(spec: Embed, inputs, grads) -> tuple[Array, Array]:
  """(N, T) table rows read and (N, T, C) their output gradients, every call's stacked."""
  ids = jnp.concatenate([x.reshape(x.shape[0], -1) for x in inputs], axis=1)
  if spec.num_embeddings:
    ids = jnp.where(ids < 0, ids + spec.num_embeddings, ids)
  return ids, _vectors(grads)


def sq_norms(spec, inputs: Sequence[Array], grads: Sequence[Array]) -> Array:
  """(N,) squared norms of each example's gradient w.r.t. all of the module's parameters."""
  if isinstance(spec, (Norm, Prepended)):
    return sum(jnp.sum(jnp.square(g), axis=1)
               for g in spec.example_grads(inputs, grads).values())
  if isinstance(spec, Embed):
    return token_norms.sq_norms(*_tokens(spec, inputs, grads))
  if isinstance(spec, Conv) and len(inputs) == 1:  # a shared kernel needs the calls' cross terms
    g = grads[0].astype(jnp.float32)
    total = spec.kernel_sq_norms(inputs[0], g)
    g = _out_rows(spec, g)
  else:
    a, g = _matrices(spec, inputs, grads)
    total = _kernel_sq_norms(a, g)
  if spec.use_bias:
    total = total + jnp.sum(jnp.square(jnp.sum(g, axis=1)), axis=1)
  return total


def clipped_sum(spec, inputs: Sequence[Array], grads: Sequence[Array], factors: Array,
                params: dict[str, Array]) -> dict[str, Array]:
  """``sum_i factors_i * grad_i`` w.r.t. the module's ``params`` (shapes and dtypes from them)."""
  if isinstance(spec, (Norm, Prepended)):
    return {name: (factors @ g).reshape(params[name].shape).astype(params[name].dtype)
            for name, g in spec.example_grads(inputs, grads).items()}
  if isinstance(spec, Embed):
    ids, g = _tokens(spec, inputs, grads)
    table = params[spec.param]
    weighted = (factors[:, None, None] * g).reshape(-1, g.shape[-1])
    summed = jnp.zeros(table.shape, jnp.float32).at[ids.reshape(-1)].add(weighted)
    return {spec.param: summed.astype(table.dtype)}
  kernel = params["kernel"].astype(jnp.float32)
  if isinstance(spec, Conv):
    inputs, grads = _f32(inputs), _f32(grads)
    summed = sum(spec.kernel_sum(x, factors.reshape(-1, *(1,) * (g.ndim - 1)) * g, kernel)
                 for x, g in zip(inputs, grads))
    g = jnp.concatenate([_out_rows(spec, gi) for gi in grads], axis=1)
  else:
    a, g = _matrices(spec, inputs, grads)
    weighted = factors[:, None, None] * g
    summed = a.reshape(-1, a.shape[-1]).T @ weighted.reshape(-1, g.shape[-1])  # one matmul
  out = {"kernel": summed.reshape(kernel.shape).astype(params["kernel"].dtype)}
  if spec.use_bias:
    bias = params["bias"]
    out["bias"] = jnp.einsum("n,ntc->c", factors, g).reshape(bias.shape).astype(bias.dtype)
  return out
