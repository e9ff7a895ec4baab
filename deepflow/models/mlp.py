"""Feedforward network (multi-layer perceptron) with a selectable activation."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from deepflow.models.layers import activation
from deepflow.registry import MODELS


@MODELS.register("mlp")
class MLP(nn.Module):
  """Flattens its input, then ``len(hidden)`` dense layers, each followed by the activation and
  dropout, then a linear head of ``num_outputs`` units."""
  num_outputs: int
  hidden: Sequence[int] = (256, 256)
  activation: str = "relu"
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    act = activation(self.activation)
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      x = nn.Dropout(self.dropout, deterministic=not train)(act(nn.Dense(width)(x)))
    return nn.Dense(self.num_outputs)(x)
