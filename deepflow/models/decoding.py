"""Autoregressive decoding: sampling tokens from deepflow's language models (``transformer_lm``,
``llama``, and ``rnn`` with ``per_step=True``).

The prompt is consumed in one call (prefill), then one token per step inside ``lax.scan``, so
``sample`` compiles to one program; wrap it as
``jax.jit(sample, static_argnums=(0, 3), static_argnames=('temperature', 'top_k', 'use_cache'))``.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from deepflow.models.llama import Llama
from deepflow.models.rnn import RNN
from deepflow.models.transformer import TransformerLM
from deepflow.registry import ConfigError

# Decoders with a key/value cache (a ``decode`` field) bounded by their ``max_len``.
CACHED = (TransformerLM, Llama)

# prefill(prompt) -> (last logits, state); advance(state, token) -> (logits, state)
Stepper = tuple[Callable[[jax.Array], tuple[jax.Array, Any]],
                Callable[[Any, jax.Array], tuple[jax.Array, Any]]]


def choose(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int) -> jax.Array:
  """Next tokens (B,) from logits (B, V): argmax when ``temperature == 0``, else a draw from
  softmax(logits / temperature) restricted to the ``top_k`` largest logits when ``top_k > 0``."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if 0 < top_k < logits.shape[-1]:
    kth = lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def check_lm(model: nn.Module, prompt: jax.Array, num_tokens: int) -> None:
  """ConfigError unless ``model`` can generate ``num_tokens`` after ``prompt`` (B, T) ints."""
  if isinstance(model, CACHED):
    vocab = model.vocab_size
  elif isinstance(model, RNN) and model.per_step and not model.bidirectional:
    vocab = model.vocab_size
  else:
    raise ConfigError(f"sample needs a generative language model (transformer_lm, llama, or rnn "
                      f"with per_step=True), got {type(model).__name__}")
  if vocab < model.num_outputs:
    raise ConfigError(f"sample needs token inputs with vocab_size >= num_outputs, got "
                      f"vocab_size={vocab}, num_outputs={model.num_outputs}")
  if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ConfigError(f"prompt must be int tokens (batch, length >= 1), got {prompt.dtype} "
                      f"{prompt.shape}")
  if num_tokens < 0:
    raise ConfigError(f"num_tokens must be >= 0, got {num_tokens}")
  total = prompt.shape[1] + num_tokens
  if isinstance(model, CACHED) and total > model.max_len:
    raise ConfigError(f"prompt length {prompt.shape[1]} + num_tokens {num_tokens} = {total} "
                      f"exceeds the model's max_len {model.max_len}")


def full_stepper(model: nn.Module, variables: Any, prompt: jax.Array, total: int) -> Stepper:
  """No cache: every step runs the plain forward pass over a fixed (B, total) buffer and reads
  the logits at the newest position (causality makes the unfilled tail irrelevant)."""
  length = prompt.shape[1]

  def prefill(prompt):
    buffer = jnp.zeros((prompt.shape[0], total), jnp.int32).at[:, :length].set(prompt)
    return model.apply(variables, buffer)[:, length - 1], (buffer, jnp.int32(length))

  def advance(state, token):
    buffer, pos = state
    buffer = buffer.at[:, pos].set(token)
    logits = lax.dynamic_index_in_dim(model.apply(variables, buffer), pos, 1, keepdims=False)
    return logits, (buffer, pos + 1)

  return prefill, advance


def cached_stepper(model: nn.Module, variables: Any, rng: jax.Array, total: int) -> Stepper:
  """With a cache: the transformer's key/value cache, holding the ``total`` positions this
  sampling fills (attention reads no slot past them), or the RNN's carried state."""
  if isinstance(model, RNN):
    def run(carries, tokens):
      logits, carries = model.apply(variables, tokens, carries=carries, return_carries=True)
      return logits[:, -1], carries
    return (lambda prompt: run(None, prompt)), (lambda state, tok: run(state, tok[:, None]))

  decoder = model.clone(decode=True, cache_len=total)

  def run(cache, tokens):
    logits, updated = decoder.apply({**variables, "cache": cache}, tokens, mutable=["cache"])
    return logits[:, -1], updated["cache"]

  def prefill(prompt):
    shapes = jax.eval_shape(decoder.init, rng, prompt)["cache"]
    return run(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), prompt)

  return prefill, (lambda state, tok: run(state, tok[:, None]))


def sample(model: nn.Module, variables: Any, prompt: jax.Array, num_tokens: int,
           rng: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
           use_cache: bool = True) -> jax.Array:
  """Continue ``prompt`` (B, T) int tokens by ``num_tokens`` -> (B, T + num_tokens) tokens.

  ``temperature == 0`` is greedy; ``top_k > 0`` samples among the k largest logits.
  ``use_cache=False`` recomputes the whole prefix each step (a reference for the cached path).
  ``variables`` are the trained ones (``params``; any ``'cache'`` in them is ignored)."""
  prompt = jnp.asarray(prompt)
  check_lm(model, prompt, num_tokens)
  if temperature < 0:
    raise ConfigError(f"temperature must be >= 0, got {temperature}")
  prompt = prompt.astype(jnp.int32)
  if num_tokens == 0:
    return prompt
  variables = {k: v for k, v in variables.items() if k != "cache"}
  total = prompt.shape[1] + num_tokens
  if use_cache:
    prefill, advance = cached_stepper(model, variables, rng, total)
  else:
    prefill, advance = full_stepper(model, variables, prompt, total)
  keys = jax.random.split(rng, num_tokens)
  logits, state = prefill(prompt)
  first = choose(logits, keys[0], temperature, top_k)

  def step(carry, key):
    state, token = carry
    logits, state = advance(state, token)
    token = choose(logits, key, temperature, top_k)
    return (state, token), token

  _, rest = lax.scan(step, (state, first), keys[1:])
  return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)
