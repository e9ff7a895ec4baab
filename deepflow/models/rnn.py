"""Recurrent networks: stacked (optionally bidirectional) simple RNN, LSTM or GRU layers."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepflow.models.layers import as_sequence
from deepflow.registry import ConfigError, MODELS

CELLS = {"rnn": nn.SimpleCell, "lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}


@MODELS.register("rnn")
class RNN(nn.Module):
  """``num_layers`` recurrent layers of ``cell`` ('rnn', 'lstm' or 'gru') under ``nn.RNN``,
  dropout between layers and before the linear head.

  Inputs are int tokens (B, T) through an ``embed_dim`` embedding when ``vocab_size > 0``, else
  float features (B, T, F) (a (B, T) series is read as F = 1). ``per_step=False`` maps the
  sequence to one output (B, num_outputs) from the last step of each direction, for
  classification and regression; ``per_step=True`` gives (B, T, num_outputs), for next-step
  language modelling, and must be unidirectional. For step-by-step generation, pass the
  ``carries`` returned by a previous call (``return_carries=True``) to continue from its state."""
  num_outputs: int
  cell: str = "lstm"
  hidden_size: int = 128
  num_layers: int = 1
  bidirectional: bool = False
  vocab_size: int = 0
  embed_dim: int = 64
  per_step: bool = False
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False,
               carries: Sequence[Any] | None = None, return_carries: bool = False) -> Any:
    if self.cell not in CELLS:
      raise ConfigError(f"unknown cell {self.cell!r}; known: {', '.join(CELLS)}")
    if self.per_step and self.bidirectional:
      raise ConfigError("per_step outputs need a unidirectional rnn (set bidirectional=False)")
    if (carries is not None or return_carries) and self.bidirectional:
      raise ConfigError("carrying state step by step needs a unidirectional rnn")
    if self.vocab_size > 0:
      if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ConfigError(f"vocab_size={self.vocab_size} expects int tokens, got {x.dtype}")
      x = nn.Embed(self.vocab_size, self.embed_dim, name="embed")(x)
    else:
      x = as_sequence(x)
    drop = nn.Dropout(self.dropout, deterministic=not train)
    cell = CELLS[self.cell]
    new_carries = []
    for i in range(self.num_layers):
      if i > 0:
        x = drop(x)
      if self.bidirectional:
        forward = nn.RNN(cell(self.hidden_size, name=f"layer{i}_forward"))
        backward = nn.RNN(cell(self.hidden_size, name=f"layer{i}_backward"))
        x = nn.Bidirectional(forward, backward)(x)
      else:
        initial = None if carries is None else carries[i]
        carry, x = nn.RNN(cell(self.hidden_size, name=f"layer{i}"))(
            x, initial_carry=initial, return_carry=True)
        new_carries.append(carry)
    if not self.per_step:
      h = self.hidden_size  # forward direction ends at the last step, backward at the first
      x = jnp.concatenate([x[:, -1, :h], x[:, 0, h:]], -1) if self.bidirectional else x[:, -1]
    out = nn.Dense(self.num_outputs, name="head")(drop(x))
    return (out, tuple(new_carries)) if return_carries else out
