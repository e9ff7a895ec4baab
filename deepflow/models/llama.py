"""The Llama-family decoder: Llama 2/3, Mistral, Qwen2, Qwen3 (and SmolLM, TinyLlama built on
them) as one configurable causal language model.

Pre-norm blocks of RMSNorm -> grouped-query attention with rotary positions (RoPE) -> residual,
RMSNorm -> SwiGLU feedforward -> residual. What distinguishes the families is a field each:
``num_kv_heads`` (GQA), ``rope_type`` and its factors (``linear``, ``llama3``), ``qkv_bias``
(Qwen2), ``qk_norm`` (Qwen3), ``sliding_window`` (Mistral), ``tie_embeddings``.
``deepflow.hf.llama`` reads these from a Hugging Face ``config.json``.

Attention runs through ``jax.nn.dot_product_attention`` with one boolean mask: causal, within
the window, within the token's segment. Packed rows (``deepflow.data.packing``) pass
``segments`` and ``positions`` as to ``transformer_lm``; rotary phases come from the positions,
so each document is computed as if it were alone. ``decode=True`` appends to a key/value cache
(collection ``'cache'``) like ``transformer_lm`` does, for ``deepflow.models.decoding``.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepflow.models.layers import block_stack, decode_cache, decode_position
from deepflow.registry import ConfigError, MODELS

ROPE_TYPES = ("default", "linear", "llama3")


def rope_frequencies(head_dim: int, theta: float, rope_type: str = "default",
                     factor: float = 1.0, low_freq_factor: float = 1.0,
                     high_freq_factor: float = 4.0, original_max_len: int = 8192) -> np.ndarray:
  """The (head_dim / 2,) rotation frequencies, computed in float32 as ``transformers`` does:
  ``linear`` divides them all by ``factor``; ``llama3`` (Llama 3.1) divides the low ones
  (wavelength past ``original_max_len / low_freq_factor``), keeps the high ones and
  interpolates between."""
  if rope_type not in ROPE_TYPES:
    raise ConfigError(f"unknown rope_type {rope_type!r}; known: {', '.join(ROPE_TYPES)}")
  f32 = np.float32
  exponents = np.arange(0, head_dim, 2).astype(f32) / f32(head_dim)
  inv = (f32(1.0) / (f32(theta) ** exponents)).astype(f32)
  if rope_type == "linear":
    return (inv / f32(factor)).astype(f32)
  if rope_type == "default":
    return inv
  wavelen = f32(2 * math.pi) / inv
  low_wavelen, high_wavelen = original_max_len / low_freq_factor, original_max_len / high_freq_factor
  scaled = np.where(wavelen > low_wavelen, inv / f32(factor), inv).astype(f32)
  smooth = ((f32(original_max_len) / wavelen - f32(low_freq_factor))
            / f32(high_freq_factor - low_freq_factor)).astype(f32)
  smoothed = ((1 - smooth) * scaled / f32(factor) + smooth * scaled).astype(f32)
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(f32)


def apply_rope(x: jax.Array, positions: jax.Array, frequencies: np.ndarray) -> jax.Array:
  """``x`` (B, T, heads, head_dim) rotated by ``positions`` (B, T): the halves of each head are
  the pairs rotated (``transformers``' ``rotate_half`` layout, not interleaved)."""
  angles = positions.astype(jnp.float32)[..., None] * frequencies  # (B, T, head_dim / 2)
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  first, second = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-second, first], axis=-1) * sin


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: int,
                   segments: jax.Array | None) -> jax.Array:
  """(B or 1, 1, queries, keys) booleans: key at or before the query (index order), fewer than
  ``window`` places before it when ``window > 0``, and in the query's segment."""
  mask = k_pos[None, :] <= q_pos[:, None]
  if window > 0:
    mask &= q_pos[:, None] - k_pos[None, :] < window
  mask = mask[None, None]
  if segments is not None:
    mask = mask & (segments[:, :, None] == segments[:, None, :])[:, None]
  return mask


class Attention(nn.Module):
  """Grouped-query causal self-attention with rotary positions: ``num_heads`` query heads
  share ``num_kv_heads`` key/value heads. ``qk_norm`` RMS-normalizes each query and key head
  before the rotation (Qwen3). ``decode``: a key/value cache of ``cache_len`` positions, written
  at its ``index`` (a whole prompt in one call, then one token per call)."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  frequencies: tuple
  qkv_bias: bool = False
  out_bias: bool = False
  qk_norm: bool = False
  norm_eps: float = 1e-6
  window: int = 0
  decode: bool = False
  cache_len: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, segments: jax.Array | None,
               positions: jax.Array) -> jax.Array:
    batch, length, dim = x.shape
    heads = lambda n, name: nn.Dense(n * self.head_dim, use_bias=self.qkv_bias, name=name)(  # noqa: E731
        x).reshape(batch, length, n, self.head_dim)
    q, k, v = heads(self.num_heads, "q"), heads(self.num_kv_heads, "k"), heads(self.num_kv_heads, "v")
    if self.qk_norm:
      q = nn.RMSNorm(self.norm_eps, name="q_norm")(q)
      k = nn.RMSNorm(self.norm_eps, name="k_norm")(k)
    frequencies = np.asarray(self.frequencies, np.float32)
    q, k = apply_rope(q, positions, frequencies), apply_rope(k, positions, frequencies)
    q_pos = k_pos = jnp.arange(length)
    if self.decode:
      k, v, q_pos, k_pos = decode_cache(self, k, v, self.cache_len)
    # Unwritten cache slots lie after every query, so the causal mask hides them too.
    mask = attention_mask(q_pos, k_pos, self.window, segments)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    return nn.Dense(dim, use_bias=self.out_bias, name="o")(
        out.reshape(batch, length, self.num_heads * self.head_dim))


class SwiGlu(nn.Module):
  """down(silu(gate(x)) * up(x)) (Shazeer, 2020)."""
  mlp_dim: int
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda n, name: nn.Dense(n, use_bias=self.use_bias, name=name)  # noqa: E731
    y = jax.nn.silu(dense(self.mlp_dim, "gate")(x)) * dense(self.mlp_dim, "up")(x)
    return dense(x.shape[-1], "down")(y)


class LlamaBlock(nn.Module):
  """x + attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)), dropout on both branches. ``train`` is
  positional for ``nn.remat`` (``layers.transformer_block``)."""
  attention: dict
  mlp_dim: int
  mlp_bias: bool = False
  norm_eps: float = 1e-6
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, segments: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    drop = nn.Dropout(self.dropout, deterministic=not train)
    y = Attention(**self.attention, name="attn")(
        nn.RMSNorm(self.norm_eps, name="input_norm")(x), segments, positions)
    x = x + drop(y)
    y = SwiGlu(self.mlp_dim, self.mlp_bias, name="mlp")(
        nn.RMSNorm(self.norm_eps, name="post_attention_norm")(x))
    return x + drop(y)


@MODELS.register("llama")
class Llama(nn.Module):
  """Llama-family causal language model: tokens (B, T) -> logits (B, T, vocab_size).

  The logits cover the whole vocabulary, tied head or not: a pretrained model keeps its
  vocabulary when fine-tuned on data that uses part of it (``num_outputs``, the data's
  vocabulary, only has to fit inside: the language-model task checks it).
  ``head_dim`` 0 means ``d_model // num_heads``; ``num_kv_heads`` 0 means ``num_heads``;
  ``sliding_window`` 0 attends to the whole prefix. ``max_len`` bounds the key/value cache
  (rotary positions themselves have no table)."""
  num_outputs: int
  vocab_size: int = 0
  d_model: int = 64
  num_heads: int = 4
  num_kv_heads: int = 0
  head_dim: int = 0
  num_layers: int = 2
  mlp_dim: int = 172
  max_len: int = 2048
  rope_theta: float = 10000.0
  rope_type: str = "default"        # default, linear, llama3
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  norm_eps: float = 1e-6
  qkv_bias: bool = False           # Qwen2: biases on q, k, v
  out_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False            # Qwen3: RMSNorm on each query and key head
  sliding_window: int = 0          # Mistral: attend to the last sliding_window tokens only
  tie_embeddings: bool = False
  dropout: float = 0.0
  remat_policy: str = "none"
  scan_layers: bool = False
  decode: bool = False
  cache_len: int = 0               # decode: positions the key/value cache holds (0 = max_len)

  def attention_fields(self) -> dict:
    """The attention's fields, sizes resolved and checked."""
    head_dim = self.head_dim or self.d_model // self.num_heads
    kv_heads = self.num_kv_heads or self.num_heads
    if not self.head_dim and self.d_model % self.num_heads:
      raise ConfigError(f"llama: d_model {self.d_model} is not divisible by num_heads "
                        f"{self.num_heads}; set head_dim")
    if self.num_heads % kv_heads:
      raise ConfigError(f"llama: num_heads {self.num_heads} is not a multiple of num_kv_heads "
                        f"{kv_heads}")
    frequencies = rope_frequencies(head_dim, self.rope_theta, self.rope_type, self.rope_factor,
                                   self.rope_low_freq_factor, self.rope_high_freq_factor,
                                   self.rope_original_max_len)
    return dict(num_heads=self.num_heads, num_kv_heads=kv_heads, head_dim=head_dim,
                frequencies=tuple(frequencies.tolist()), qkv_bias=self.qkv_bias,
                out_bias=self.out_bias, qk_norm=self.qk_norm, norm_eps=self.norm_eps,
                window=self.sliding_window, decode=self.decode,
                cache_len=self.cache_len or self.max_len)

  @nn.compact
  def __call__(self, x: jax.Array, segments: jax.Array | None = None,
               positions: jax.Array | None = None, *, train: bool = False) -> jax.Array:
    if self.vocab_size <= 0 or not jnp.issubdtype(x.dtype, jnp.integer):
      raise ConfigError(f"llama takes int tokens and vocab_size > 0, got {x.dtype} inputs and "
                        f"vocab_size={self.vocab_size}")
    if self.decode and segments is not None:
      raise ConfigError("llama decodes one sequence per row: no segments")
    if x.shape[1] > self.max_len:
      raise ConfigError(f"sequence length {x.shape[1]} exceeds max_len {self.max_len}")
    offset = decode_position(self, x.shape[1]) if self.decode else 0
    if positions is None:
      positions = jnp.broadcast_to(offset + jnp.arange(x.shape[1]), x.shape)
    table = nn.Embed(self.vocab_size, self.d_model, name="embed")
    h = nn.Dropout(self.dropout, deterministic=not train)(table(x))
    h = block_stack(h, train, num_layers=self.num_layers, scan=self.scan_layers,
                    remat_policy="none" if self.decode else self.remat_policy,
                    segments=segments, block_cls=LlamaBlock, extra=(positions,),
                    attention=self.attention_fields(), mlp_dim=self.mlp_dim,
                    mlp_bias=self.mlp_bias, norm_eps=self.norm_eps, dropout=self.dropout)
    h = nn.RMSNorm(self.norm_eps, name="final_norm")(h)
    if self.tie_embeddings:
      return table.attend(h)
    return nn.Dense(self.vocab_size, use_bias=False, name="head")(h)
