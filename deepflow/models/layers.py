"""Blocks shared by several model families, and the activation table.

Activations are registered by name so a config can say ``model.activation = 'tanh'``.
"""
from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from deepflow.models import scan_taps
from deepflow.registry import ACTIVATIONS, ConfigError

Activation = Callable[[jax.Array], jax.Array]

for _name, _fn in {
    "sigmoid": jax.nn.sigmoid,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,                                         # tanh approximation
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),  # erf, PyTorch's default
    "silu": jax.nn.silu,
    "leaky_relu": jax.nn.leaky_relu,
    "elu": jax.nn.elu,
    "softplus": jax.nn.softplus,
    "relu6": jax.nn.relu6,
    "mish": jax.nn.mish,
    "identity": lambda x: x,
}.items():
  ACTIVATIONS.register(_name)(_fn)


def require_images(x: jax.Array, model: str) -> None:
  """A model that takes NHWC images, fed anything else, stops with one line naming it."""
  if x.ndim != 4:
    raise ConfigError(f"{model} expects NHWC images, got inputs of shape {x.shape}")


def _unfusable_identity(x: jax.Array) -> jax.Array:
  # The rewritten block spans the first and last axes (batch and features), which are the ones
  # sharded: every shard rewrites its own part, with no collective.
  zeros = (0,) * x.ndim
  block = (x.shape[0], *(1,) * (x.ndim - 2), x.shape[-1]) if x.ndim > 1 else (1,)
  return lax.dynamic_update_slice(x, lax.slice(x, zeros, block), zeros)


def materialize(x: jax.Array) -> jax.Array:
  """``x`` itself; on CPU, computed once into memory rather than recomputed by its consumers.

  XLA:CPU fuses cheap elementwise producers into every consumer, duplicating them. In a
  residual network each block's output is a chain of batch norms, adds and ReLUs over every
  earlier block, and the transposes XLA puts in front of each convolution's kernel gradient
  recomputed that whole chain with strided reads: ResNet-20's train step ran 1.3x slower
  (``benchmarks/vs_pytorch.py``). Writing a corner of ``x`` back into it is an
  identity whose result XLA:CPU writes to memory, so its consumers read it instead of fusing
  its producers in (``optimization_barrier`` is removed before fusion on CPU and does not do
  this). Other platforms get ``x`` untouched (chosen when the step is lowered for its
  platform)."""
  return lax.platform_dependent(x, cpu=_unfusable_identity, default=lambda x: x)


def activation(name: str) -> Activation:
  """The activation function registered under ``name`` (a ConfigError lists the known ones)."""
  return ACTIVATIONS.get(name)


# --- Transformer blocks (shared by transformer.py and vit.py) ---------------------------------


def sinusoidal_positions(positions: jax.Array, dim: int) -> jax.Array:
  """Fixed sine/cosine encodings (Vaswani et al., 2017) of integer ``positions`` -> (..., dim).

  Computed from the positions themselves, so a decoding step at offset ``t`` gets row ``t``."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / max(half, 1))
  angles = positions.astype(jnp.float32)[..., None] * freqs
  enc = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return jnp.pad(enc, [(0, 0)] * (enc.ndim - 1) + [(0, dim - 2 * half)])


class PositionalEmbedding(nn.Module):
  """Adds position information to (B, T, D) inputs: ``'learned'`` (a table of ``max_len`` rows,
  the parameter ``param_name``) or ``'sinusoidal'``. ``offset`` is the position of the first
  input (non-zero when decoding). A layer of its own so that DP-SGD's ghost clipping sees its
  calls (``deepflow.privacy.ghost_layers``)."""
  kind: str = "learned"
  max_len: int = 512
  param_name: str = "embedding"

  @nn.compact
  def __call__(self, x: jax.Array, offset: jax.Array | int = 0,
               positions: jax.Array | None = None) -> jax.Array:
    """``positions`` (B, T), optional: each token's own position (packed documents restart
    at 0), instead of ``offset + 0, 1, ...``."""
    length, dim = x.shape[-2], x.shape[-1]
    if length > self.max_len:
      raise ConfigError(f"sequence length {length} exceeds max_len {self.max_len}")
    if self.kind == "learned":
      table = self.param(self.param_name, nn.initializers.normal(0.02), (self.max_len, dim))
      rows = (lax.dynamic_slice_in_dim(table, offset, length, axis=0) if positions is None
              else jnp.take(table, positions, axis=0))
      return x + rows.astype(x.dtype)
    if self.kind == "sinusoidal":
      where = offset + jnp.arange(length) if positions is None else positions
      return x + sinusoidal_positions(where, dim).astype(x.dtype)
    raise ConfigError(f"unknown positions {self.kind!r}; known: learned, sinusoidal")


def in_scope(parent: nn.Module, layer: nn.Module) -> nn.Module:
  """``layer`` creating its parameters in ``parent``'s scope: a parameter moved into a layer of
  its own keeps its path (checkpoints load as before)."""
  nn.share_scope(parent, layer)
  return layer


class ClassToken(nn.Module):
  """Prepends a learned token (the parameter ``param_name``, (1, 1, D), zeros) to (B, T, D)
  inputs. A layer of its own for ghost clipping, like ``PositionalEmbedding``; the models share
  their scope with it (``nn.share_scope``) so the parameter keeps its path."""
  param_name: str = "cls"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cls = self.param(self.param_name, nn.initializers.zeros, (1, 1, x.shape[-1]))
    return jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[-1])), x], axis=1)


class MlpBlock(nn.Module):
  """The transformer feedforward: dense ``mlp_dim`` -> activation -> dropout -> dense back."""
  mlp_dim: int
  activation: str = "gelu"
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = activation(self.activation)(nn.Dense(self.mlp_dim)(x))
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    return nn.Dense(x.shape[-1])(y)


def decode_cache(module: nn.Module, k: jax.Array, v: jax.Array, cache_len: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Autoregressive decoding's key/value cache in ``module``'s collection ``'cache'``: this
  call's keys and values (B, T, heads, head_dim) written at the cache's index, and (keys, values,
  query positions, key positions) to attend with: the whole cache, the queries at their place in
  it. The first call (``init``) only creates the cache (zeros, index 0) and attends as given."""
  batch, length = k.shape[:2]
  q_pos = k_pos = jnp.arange(length)
  ready = module.has_variable("cache", "key")
  shape = (batch, cache_len, *k.shape[2:])
  cached_k = module.variable("cache", "key", jnp.zeros, shape, k.dtype)
  cached_v = module.variable("cache", "value", jnp.zeros, shape, v.dtype)
  index = module.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
  if ready:
    start = index.value
    cached_k.value = lax.dynamic_update_slice(cached_k.value, k, (0, start, 0, 0))
    cached_v.value = lax.dynamic_update_slice(cached_v.value, v, (0, start, 0, 0))
    index.value = start + length
    k, v = cached_k.value, cached_v.value
    q_pos, k_pos = start + jnp.arange(length), jnp.arange(cache_len)
  return k, v, q_pos, k_pos


def decode_position(module: nn.Module, length: int) -> jax.Array | int:
  """Where this call's ``length`` tokens start in a decoding model's sequence: the count kept in
  ``module``'s collection ``'cache'`` (``position``), advanced past them. The first call
  (``init``) only creates it (0) and starts at 0."""
  ready = module.has_variable("cache", "position")
  position = module.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
  if not ready:
    return 0
  offset = position.value
  position.value = offset + length
  return offset


class SelfAttention(nn.Module):
  """Multi-head self-attention, optionally causal, with a key/value cache when ``decode``.

  Written here rather than using ``nn.MultiHeadDotProductAttention(decode=True)`` because that
  cache accepts one token per call; this one also accepts a whole prompt, so decoding prefills
  in one pass. The cache (collection ``'cache'``) holds ``cache_len`` positions; the first
  ``init`` with ``decode=True`` only creates it (zeros, index 0).

  The query, key and value projections are one kernel ``qkv`` (d, 3, heads, head_dim), or with
  ``split_qkv`` three, ``query``/``key``/``value`` (d, heads, head_dim): the layout of
  checkpoints that store them apart (Hugging Face ViT). ``qkv_bias`` False drops their biases."""
  num_heads: int
  causal: bool = False
  decode: bool = False
  cache_len: int = 0
  qkv_bias: bool = True
  split_qkv: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, segments: jax.Array | None = None) -> jax.Array:
    """``segments`` (B, T) int, optional: a token attends only to tokens of its own segment
    (packed documents 1, 2, ...; padding is 0, so a real token never attends to padding)."""
    batch, length, dim = x.shape
    if dim % self.num_heads:
      raise ConfigError(f"d_model {dim} is not divisible by num_heads {self.num_heads}")
    head_dim = dim // self.num_heads
    if self.split_qkv:
      q, k, v = (nn.DenseGeneral((self.num_heads, head_dim), use_bias=self.qkv_bias, name=n)(x)
                 for n in ("query", "key", "value"))
    else:
      qkv = nn.DenseGeneral((3, self.num_heads, head_dim), use_bias=self.qkv_bias, name="qkv")(x)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q_pos = k_pos = jnp.arange(length)
    causal = self.causal
    if self.decode:
      causal = True
      k, v, q_pos, k_pos = decode_cache(self, k, v, self.cache_len)
    # Unwritten cache slots lie after every query, so the causal mask hides them too.
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None] if causal else None
    if segments is not None:  # (B, 1, queries, keys): same segment only
      same = (segments[:, :, None] == segments[:, None, :])[:, None]
      mask = same if mask is None else mask & same
    # XLA's fused attention everywhere, cuDNN's flash attention on a GPU when it applies.
    out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    return nn.DenseGeneral(dim, axis=(-2, -1), name="out")(out)


class TransformerBlock(nn.Module):
  """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x)), dropout on both branches.

  ``train`` is positional so the block can be wrapped in ``nn.remat(..., static_argnums=(2,))``;
  ``segments`` (optional) restrict attention to each token's own segment (``SelfAttention``,
  which also reads ``qkv_bias`` and ``split_qkv``)."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  activation: str = "gelu"
  causal: bool = False
  decode: bool = False
  cache_len: int = 0
  norm_eps: float = 1e-6       # the LayerNorms' epsilon (GPT-2's is 1e-5)
  qkv_bias: bool = True
  split_qkv: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               segments: jax.Array | None = None) -> jax.Array:
    drop = nn.Dropout(self.dropout, deterministic=not train)
    y = SelfAttention(self.num_heads, self.causal, self.decode, self.cache_len, self.qkv_bias,
                      self.split_qkv)(nn.LayerNorm(self.norm_eps)(x), segments)
    x = x + drop(y)
    y = MlpBlock(self.mlp_dim, self.activation, self.dropout)(nn.LayerNorm(self.norm_eps)(x),
                                                              train)
    return x + drop(y)


REMAT_POLICIES = ("none", "full", *sorted(
    name for name in dir(jax.checkpoint_policies) if name.endswith("saveable")))


def transformer_block(remat_policy: str = "none", cls: type[nn.Module] = TransformerBlock
                      ) -> type[nn.Module]:
  """The block class ``cls``, wrapped in ``nn.remat`` unless ``remat_policy`` is 'none': 'full'
  recomputes every activation in the backward pass, a ``jax.checkpoint_policies`` name (e.g.
  'dots_saveable': keep matmul outputs) recomputes only what the policy does not save."""
  if remat_policy not in REMAT_POLICIES:
    raise ConfigError(f"unknown remat_policy {remat_policy!r}; known: {', '.join(REMAT_POLICIES)}")
  if remat_policy == "none":
    return cls
  policy = None if remat_policy == "full" else getattr(jax.checkpoint_policies, remat_policy)
  return nn.remat(cls, static_argnums=(2,), policy=policy)


class _ScannedBlock(nn.Module):
  """One block as a ``nn.scan`` body: (carry, segments, *extra) -> (carry, what a listener
  kept in it: ``scan_taps``)."""
  block: dict
  remat_policy: str
  train: bool
  block_cls: type = TransformerBlock

  @nn.compact
  def __call__(self, x: jax.Array, segments: jax.Array | None,
               *extra: jax.Array) -> tuple[jax.Array, dict]:
    block = transformer_block(self.remat_policy, self.block_cls)(**self.block, name="block")
    with scan_taps.body() as kept:  # values a listener keeps (none without one)
      x = block(x, self.train, segments, *extra)
    return x, kept


def block_stack(x: jax.Array, train: bool, *, num_layers: int, scan: bool, remat_policy: str,
                segments: jax.Array | None = None, block_cls: type = TransformerBlock,
                extra: tuple = (), **block) -> jax.Array:
  """``num_layers`` blocks (``block_cls``, called ``(x, train, segments, *extra)``; fields
  ``block``) applied in turn; call inside a compact method. With ``scan`` one block is traced
  and ``nn.scan`` repeats it over parameters stacked on a leading layer axis
  (``blocks/block/...``): compile time stays flat with depth; what a listener keeps inside the
  body leaves as its stacked outputs (``scan_taps``). Otherwise each block is its own
  submodule ``block{i}``. ``segments``: see ``SelfAttention``."""
  if not scan:
    cls = transformer_block(remat_policy, block_cls)
    for i in range(num_layers):
      x = cls(**block, name=f"block{i}")(x, train, segments, *extra)
    return x
  stack = nn.scan(_ScannedBlock, variable_axes={"params": 0, "cache": 0},
                  split_rngs={"params": True, "dropout": True}, in_axes=nn.broadcast,
                  length=num_layers)
  x, kept = stack(block, remat_policy, train, block_cls, name="blocks")(x, segments, *extra)
  scan_taps.emit(kept)
  return x


def as_sequence(x: jax.Array) -> jax.Array:
  """Float inputs as a (B, T, F) sequence of feature vectors: a univariate series (B, T) gets
  F = 1, and anything of higher rank is read along its second axis, e.g. an NHWC image row by
  row with F = W * C (how an RNN or a Transformer sees a digit)."""
  if x.ndim == 2:
    return x[..., None]
  return x.reshape(x.shape[0], x.shape[1], -1)
