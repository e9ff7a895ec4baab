"""Transformers: an encoder for sequence-to-one tasks and a decoder-only language model.

Both are pre-LN stacks of ``layers.TransformerBlock``. Inputs are int tokens (B, T) embedded
into ``d_model`` when ``vocab_size > 0``, or float features (B, T, F) (or (B, T)) projected to
``d_model`` when ``vocab_size == 0``. The LM decodes with a key/value cache when ``decode`` is
set (see ``deepflow.models.decoding``).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepflow.models.layers import (ClassToken, PositionalEmbedding, as_sequence, block_stack,
                                    decode_position, in_scope)
from deepflow.registry import ConfigError, MODELS

POOLINGS = ("mean", "cls")


def embed_inputs(x: jax.Array, vocab_size: int, d_model: int,
                 table: nn.Embed | None = None) -> jax.Array:
  """Tokens (B, T) through an embedding table (``table``, or a new one), or float features
  projected to ``d_model``.

  Call inside a compact method; the created submodule is named ``embed``."""
  if vocab_size > 0:
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ConfigError(f"vocab_size={vocab_size} expects int tokens, got {x.dtype} inputs")
    return (table or nn.Embed(vocab_size, d_model, name="embed"))(x)
  return nn.Dense(d_model, name="embed")(as_sequence(x))


@MODELS.register("transformer_encoder")
class TransformerEncoder(nn.Module):
  """Bidirectional encoder -> final LayerNorm -> ``pooling`` ('mean' over time, or a learned
  'cls' token prepended to the sequence) -> dropout -> linear head of ``num_outputs``.

  For sequence classification and sequence-to-one regression or forecasting."""
  num_outputs: int
  vocab_size: int = 0
  d_model: int = 64
  num_heads: int = 4
  num_layers: int = 2
  mlp_dim: int = 128
  max_len: int = 512
  positions: str = "learned"
  pooling: str = "mean"
  activation: str = "gelu"
  dropout: float = 0.0
  remat_policy: str = "none"   # none, full, or a jax.checkpoint_policies name (dots_saveable)
  scan_layers: bool = False    # nn.scan over the blocks: stacked parameters, flat compile time

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if self.pooling not in POOLINGS:
      raise ConfigError(f"unknown pooling {self.pooling!r}; known: {', '.join(POOLINGS)}")
    x = embed_inputs(x, self.vocab_size, self.d_model)
    if self.pooling == "cls":
      x = in_scope(self, ClassToken())(x)
    x = PositionalEmbedding(self.positions, self.max_len, name="positions")(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = block_stack(x, train, num_layers=self.num_layers, scan=self.scan_layers,
                    remat_policy=self.remat_policy, num_heads=self.num_heads,
                    mlp_dim=self.mlp_dim, dropout=self.dropout, activation=self.activation)
    x = nn.LayerNorm(name="final_norm")(x)
    x = x[:, 0] if self.pooling == "cls" else x.mean(axis=1)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_outputs, name="head")(x)


@MODELS.register("transformer_lm")
class TransformerLM(nn.Module):
  """Decoder-only (GPT-style) causal language model: logits (B, T, num_outputs=vocabulary).

  With ``decode=True`` each call appends its tokens to a key/value cache in the ``'cache'``
  collection and positions continue from the tokens already cached; initialise that cache
  with ``init`` on the decode-mode module (``decoding.sample`` does this). ``max_len`` bounds
  both the positions and the cache.

  Packed rows (``deepflow.data.packing``) pass ``segments`` (B, T): a token attends only to
  earlier tokens of its own segment (document; 0 is padding), and ``positions`` (B, T): its
  position inside that segment, so each document is computed as if it were alone.

  ``tie_embeddings``: the head is the token embedding's transpose (no bias; logits over the
  ``vocab_size`` tokens), as in GPT-2, which is this model with ``norm_eps=1e-5``
  (``deepflow.hf.gpt2``)."""
  num_outputs: int
  vocab_size: int = 0
  d_model: int = 64
  num_heads: int = 4
  num_layers: int = 2
  mlp_dim: int = 128
  max_len: int = 256
  positions: str = "learned"
  activation: str = "gelu"
  dropout: float = 0.0
  remat_policy: str = "none"   # none, full, or a jax.checkpoint_policies name (dots_saveable)
  scan_layers: bool = False    # nn.scan over the blocks: stacked parameters, flat compile time
  norm_eps: float = 1e-6       # the LayerNorms' epsilon
  tie_embeddings: bool = False  # the head is the token embedding's transpose
  decode: bool = False
  cache_len: int = 0           # decode: positions the key/value cache holds (0 = max_len)

  @nn.compact
  def __call__(self, x: jax.Array, segments: jax.Array | None = None,
               positions: jax.Array | None = None, *, train: bool = False) -> jax.Array:
    if self.decode and segments is not None:
      raise ConfigError("transformer_lm decodes one sequence per row: no segments")
    offset = decode_position(self, x.shape[1]) if self.decode else 0
    if self.tie_embeddings and self.vocab_size <= 0:
      raise ConfigError("transformer_lm: tie_embeddings needs token inputs (vocab_size > 0)")
    table = nn.Embed(self.vocab_size, self.d_model, name="embed") if self.tie_embeddings else None
    x = embed_inputs(x, self.vocab_size, self.d_model, table)
    x = PositionalEmbedding(self.positions, self.max_len, name="positions")(x, offset, positions)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = block_stack(x, train, num_layers=self.num_layers, scan=self.scan_layers,
                    remat_policy="none" if self.decode else self.remat_policy, segments=segments,
                    num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout,
                    activation=self.activation, causal=True, decode=self.decode,
                    cache_len=self.cache_len or self.max_len, norm_eps=self.norm_eps)
    x = nn.LayerNorm(self.norm_eps, name="final_norm")(x)
    return table.attend(x) if table else nn.Dense(self.num_outputs, name="head")(x)
