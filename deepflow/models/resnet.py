"""Residual networks (He et al., 2016) with batch norm, sized for small images by default."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepflow.models import pooling
from deepflow.models.conv import Conv
from deepflow.models.layers import activation, materialize, require_images
from deepflow.registry import ConfigError, MODELS

STEMS = ("small", "imagenet")
PADDINGS = ("same", "symmetric")
GLOBAL_POOLS = {"avg": jnp.mean, "max": jnp.max}


def pads(window: int, padding: str) -> str | tuple[tuple[int, int], ...]:
  """A ``window`` x ``window`` conv's or pool's padding. ``'same'``: flax's ``'SAME'``, which pads
  a stride-2 window more at the end than at the start; ``'symmetric'``: ``window // 2`` on both
  sides, as PyTorch's ResNets (torchvision, Hugging Face) pad, whose weights expect it."""
  return "SAME" if padding == "same" else ((window // 2, window // 2),) * 2


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Stochastic depth (Huang et al., 2016): zero the whole of ``x`` for a random ``rate`` of the
  examples and scale the rest by 1/(1-rate), so the expected value is unchanged."""
  keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class ResidualBlock(nn.Module):
  """act(shortcut(x) + branch(x)). ``'basic'``: two 3x3 convs; ``'bottleneck'``: 1x1 -> 3x3 ->
  1x1 with 4x ``width`` outputs, strided in the 3x3 conv (ResNet v1.5) or with
  ``downsample_in_bottleneck`` in the first 1x1 (v1). Every conv is followed by batch norm. The
  shortcut is a 1x1 strided conv + batch norm when the shape changes. ``padding``: see
  ``pads``. ``drop_rate`` drops the branch per example during training (stochastic depth).
  ``train`` is positional so ``nn.remat`` can treat it as static."""
  width: int
  strides: int = 1
  kind: str = "basic"
  activation: str = "relu"
  drop_rate: float = 0.0
  padding: str = "same"
  downsample_in_bottleneck: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    act = activation(self.activation)
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)  # noqa: E731
    s = (self.strides, self.strides)

    def conv(width: int, window: int, strides=(1, 1), **kw) -> nn.Module:
      return Conv(width, (window, window), strides, padding=pads(window, self.padding),
                  use_bias=False, **kw)
    # Every convolution's input is materialized: on CPU this keeps the residual stream's chain
    # of norms, adds and activations from being recomputed inside the convolutions' gradients.
    x = materialize(x)
    if self.kind == "basic":
      y = materialize(act(norm()(conv(self.width, 3, s)(x))))
      y = norm()(conv(self.width, 3)(y))
      out_width = self.width
    elif self.kind == "bottleneck":
      s1, s3 = (s, (1, 1)) if self.downsample_in_bottleneck else ((1, 1), s)
      y = materialize(act(norm()(conv(self.width, 1, s1)(x))))
      y = materialize(act(norm()(conv(self.width, 3, s3)(y))))
      out_width = 4 * self.width
      y = norm()(conv(out_width, 1)(y))
    else:
      raise ConfigError(f"unknown block {self.kind!r}; known: basic, bottleneck")
    shortcut = x
    if x.shape[-1] != out_width or self.strides != 1:
      shortcut = norm()(conv(out_width, 1, s, name="shortcut")(x))
    if train and self.drop_rate > 0.0:
      y = drop_path(y, self.drop_rate, self.make_rng("dropout"))
    return act(shortcut + y)


@MODELS.register("resnet")
class ResNet(nn.Module):
  """Stem -> stages of residual blocks -> global ``pooling`` -> dropout -> linear head.

  Stage ``i`` has ``stage_sizes[i]`` blocks of width ``width * 2**i``; every stage after the
  first (and with ``downsample_in_first_stage`` the first too) halves the resolution in its first
  block. The ``'small'`` stem is one 3x3 conv with no
  pooling (deepflow's bundled images are 8x8); ``'imagenet'`` is a 7x7 stride-2 conv and a 3x3
  stride-2 max pool. Stochastic depth rates grow linearly over blocks up to
  ``stochastic_depth`` at the last block. ``remat`` recomputes each block in the backward pass.
  The defaults give ResNet-20 of the CIFAR paper; ``padding='symmetric'`` with the
  ``'imagenet'`` stem is the layout of torchvision's and Hugging Face's ResNets
  (``deepflow.hf.resnet``)."""
  num_outputs: int
  stage_sizes: Sequence[int] = (3, 3, 3)
  width: int = 16
  block: str = "basic"
  stem: str = "small"
  pooling: str = "avg"
  activation: str = "relu"
  stochastic_depth: float = 0.0
  dropout: float = 0.0
  remat: bool = False
  padding: str = "same"        # 'same' (flax) or 'symmetric' (PyTorch): see pads
  downsample_in_first_stage: bool = False
  downsample_in_bottleneck: bool = False  # stride in the bottleneck's first 1x1, not its 3x3

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    require_images(x, "resnet")
    if self.stem not in STEMS:
      raise ConfigError(f"unknown stem {self.stem!r}; known: {', '.join(STEMS)}")
    if self.padding not in PADDINGS:
      raise ConfigError(f"unknown padding {self.padding!r}; known: {', '.join(PADDINGS)}")
    if self.pooling not in GLOBAL_POOLS:
      raise ConfigError(f"unknown pooling {self.pooling!r}; known: {', '.join(GLOBAL_POOLS)}")
    if not 0.0 <= self.stochastic_depth < 1.0:
      raise ConfigError(f"stochastic_depth must be in [0, 1), got {self.stochastic_depth}")
    act = activation(self.activation)
    if self.stem == "small":
      x = Conv(self.width, (3, 3), use_bias=False, name="stem")(x)
    else:
      x = Conv(self.width, (7, 7), (2, 2), padding=pads(7, self.padding), use_bias=False,
               name="stem")(x)
    x = act(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_norm")(x))
    if self.stem == "imagenet":
      x = pooling.max_pool(x, (3, 3), (2, 2), padding=pads(3, self.padding))
    block_cls = nn.remat(ResidualBlock, static_argnums=(2,)) if self.remat else ResidualBlock
    total, index = sum(self.stage_sizes), 0
    for stage, num_blocks in enumerate(self.stage_sizes):
      for b in range(num_blocks):
        index += 1
        downsample = b == 0 and (stage > 0 or self.downsample_in_first_stage)
        x = block_cls(self.width * 2**stage, 2 if downsample else 1, self.block,
                      self.activation, self.stochastic_depth * index / total, self.padding,
                      self.downsample_in_bottleneck, name=f"stage{stage}_block{b}")(x, train)
    x = GLOBAL_POOLS[self.pooling](x, axis=(1, 2))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_outputs, name="head")(x)
