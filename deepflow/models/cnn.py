"""Convolutional networks: conv + pooling blocks, then a dense head (LeNet-5 is a preset)."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from deepflow.models import pooling
from deepflow.models.conv import Conv
from deepflow.models.layers import activation
from deepflow.registry import ConfigError, MODELS

POOLS = {"max": pooling.max_pool, "avg": pooling.avg_pool}


def pool(name: str, x: jax.Array, window: int) -> jax.Array:
  """Spatial pooling by name (``max``, ``avg``, or ``none``) with stride = window."""
  if name == "none" or window <= 1:
    return x
  if name not in POOLS:
    raise ConfigError(f"unknown pooling {name!r}; known: none, {', '.join(POOLS)}")
  return POOLS[name](x, (window, window), strides=(window, window), padding="SAME")


@MODELS.register("cnn")
class CNN(nn.Module):
  """``len(features)`` blocks of [conv -> activation -> pool], then dense layers and a head.

  Inputs are NHWC images (a 2-D input of flattened pixels is rejected by the data check)."""
  num_outputs: int
  features: Sequence[int] = (32, 64)
  kernel_size: int = 3
  padding: str = "SAME"
  pooling: str = "max"
  pool_size: int = 2
  dense: Sequence[int] = (128,)
  activation: str = "relu"
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    act = activation(self.activation)
    for width in self.features:
      x = Conv(width, (self.kernel_size, self.kernel_size), padding=self.padding)(x)
      x = pool(self.pooling, act(x), self.pool_size)
    x = x.reshape(x.shape[0], -1)
    for width in self.dense:
      x = nn.Dropout(self.dropout, deterministic=not train)(act(nn.Dense(width)(x)))
    return nn.Dense(self.num_outputs)(x)


@MODELS.register("lenet5")
class LeNet5(nn.Module):
  """LeNet-5 (LeCun et al., 1998) adapted to small inputs: two 5x5 convs (6, 16 maps) with
  average pooling, dense 120 -> 84 -> outputs, tanh by default as in the original."""
  num_outputs: int
  activation: str = "tanh"
  pooling: str = "avg"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    act = activation(self.activation)
    x = pool(self.pooling, act(Conv(6, (5, 5), padding="SAME")(x)), 2)
    x = pool(self.pooling, act(Conv(16, (5, 5), padding="SAME")(x)), 2)
    x = x.reshape(x.shape[0], -1)
    x = act(nn.Dense(84)(act(nn.Dense(120)(x))))
    return nn.Dense(self.num_outputs)(x)
