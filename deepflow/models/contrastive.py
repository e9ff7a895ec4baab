"""SimCLR-style contrastive learning (Chen et al., 2020): a small conv backbone, a projection
head, and the NT-Xent loss."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepflow.models.conv import Conv
from deepflow.models.layers import activation, require_images
from deepflow.registry import MODELS


class ConvBackbone(nn.Module):
  """``len(widths)`` blocks of [3x3 conv -> batch norm -> activation], each after the first
  halving the resolution (stride 2), then global average pooling -> (B, widths[-1])."""
  widths: Sequence[int] = (32, 64)
  activation: str = "relu"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    act = activation(self.activation)
    for i, width in enumerate(self.widths):
      strides = (2, 2) if i > 0 else (1, 1)
      x = Conv(width, (3, 3), strides, use_bias=False)(x)
      x = act(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    return x.mean(axis=(1, 2))


@MODELS.register("contrastive_cnn")
class ContrastiveCNN(nn.Module):
  """A conv backbone (``widths``, see ``ConvBackbone``) giving representations (method
  ``features``), and a projection head MLP
  (dense ``projection_hidden`` -> activation -> dense ``projection_dim``) whose output the
  contrastive loss compares (``__call__``). Downstream tasks use ``features``, not the
  projection. ``num_outputs`` is unused by the contrastive objective (kept first for the model
  contract); ``dropout`` applies before the projection head."""
  num_outputs: int
  widths: Sequence[int] = (32, 64)
  projection_hidden: int = 128
  projection_dim: int = 64
  activation: str = "relu"
  dropout: float = 0.0

  def setup(self):
    self.backbone = ConvBackbone(tuple(self.widths), self.activation)
    self.hidden = nn.Dense(self.projection_hidden)
    self.projection = nn.Dense(self.projection_dim)
    self.drop = nn.Dropout(self.dropout)

  def features(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Representations (B, widths[-1]) for linear probes and downstream tasks."""
    require_images(x, "contrastive_cnn")
    return self.backbone(x, train)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    h = self.drop(self.features(x, train=train), deterministic=not train)
    h = activation(self.activation)(self.hidden(h))
    return self.projection(h)


@MODELS.register("encoder_cnn")
class EncoderCNN(nn.Module):
  """``contrastive_cnn``'s conv backbone (the same parameter names, ``backbone/...``) with a
  dense classification ``head``: the network a contrastively pre-trained encoder is fine-tuned
  in (``model.init_from`` a ``contrastive_cnn`` run with
  ``model.init_skip='^params/(head|hidden|projection)/'``); ``dropout`` applies before the
  head."""
  num_outputs: int
  widths: Sequence[int] = (32, 64)
  activation: str = "relu"
  dropout: float = 0.0

  def setup(self):
    self.backbone = ConvBackbone(tuple(self.widths), self.activation)
    self.drop = nn.Dropout(self.dropout)
    self.head = nn.Dense(self.num_outputs)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    require_images(x, "encoder_cnn")
    return self.head(self.drop(self.backbone(x, train), deterministic=not train))


def nt_xent_loss(z1: jax.Array, z2: jax.Array, temperature: float = 0.5) -> jax.Array:
  """Normalized temperature-scaled cross entropy over the 2N views (SimCLR).

  ``z1[i]`` and ``z2[i]`` are two views of example ``i``. Each of the 2N L2-normalized views is
  classified among the other 2N - 1 by cosine similarity / temperature, the positive being
  the other view of the same example; the loss is the mean over all 2N views."""
  # Written blockwise (view 1 against views 1 and 2, view 2 against both; the two blocks' row
  # sums joined with logaddexp), with the positives as row-wise dot products: on a batch sharded
  # over devices this needs only all-gathers of the right-hand operands. Concatenating views
  # or blocks instead compiled to all-to-alls, which deadlocked XLA's CPU collectives on 8
  # simulated devices.
  def normalize(z):
    z = z.astype(jnp.float32)
    return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)

  z1, z2 = normalize(z1), normalize(z2)
  self_mask = jnp.eye(z1.shape[0], dtype=bool)  # a view is not its own positive

  def view_loss(a, b):
    """Loss of each view in ``a``: its positive is the same row of ``b``; the negatives are the
    other rows of ``a`` and of ``b``."""
    same = jnp.where(self_mask, -jnp.inf, a @ a.T / temperature)
    other = a @ b.T / temperature
    lse = jnp.logaddexp(jax.nn.logsumexp(same, axis=1), jax.nn.logsumexp(other, axis=1))
    return lse - jnp.sum(a * b, axis=-1) / temperature

  return 0.5 * (view_loss(z1, z2).mean() + view_loss(z2, z1).mean())
