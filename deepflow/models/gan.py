"""DCGAN (Radford et al., 2016) for small images, optionally class-conditional, and GAN losses.

One module holds both networks, so ``params`` (and ``batch_stats``) are
``{'generator': ..., 'discriminator': ...}`` and a task can give each sub-tree its own optimizer.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepflow.models.layers import activation
from deepflow.registry import ConfigError, MODELS

LOSSES = ("non_saturating", "hinge")


def check_image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
  """(H, W, C) with H and W divisible by 4 (the networks up/down-sample twice by 2)."""
  if len(image_shape) != 3:
    raise ConfigError(f"image_shape must be (height, width, channels), got {tuple(image_shape)}")
  height, width, channels = (int(s) for s in image_shape)
  if height % 4 or width % 4:
    raise ConfigError(f"dcgan image size {height}x{width} must be divisible by 4")
  return height, width, channels


class Generator(nn.Module):
  """Latent (B, latent_dim) [+ label embedding] -> dense to (H/4, W/4, 2*features) -> two
  stride-2 transposed convs (batch norm + relu between) -> (B, H, W, C) images."""
  image_shape: Sequence[int] = (8, 8, 1)
  num_classes: int = 0
  features: int = 64
  embed_dim: int = 16
  output_activation: str = "identity"

  @nn.compact
  def __call__(self, z: jax.Array, labels: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    height, width, channels = check_image_shape(self.image_shape)
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)  # noqa: E731
    if self.num_classes > 0:
      z = jnp.concatenate([z, nn.Embed(self.num_classes, self.embed_dim)(labels)], axis=-1)
    x = nn.Dense(height // 4 * width // 4 * 2 * self.features, use_bias=False)(z)
    x = nn.relu(norm()(x.reshape(z.shape[0], height // 4, width // 4, 2 * self.features)))
    x = nn.ConvTranspose(self.features, (4, 4), (2, 2), use_bias=False)(x)
    x = nn.relu(norm()(x))
    x = nn.ConvTranspose(channels, (4, 4), (2, 2))(x)
    return activation(self.output_activation)(x)


class Discriminator(nn.Module):
  """Images [+ label embedding tiled as extra channels] -> two stride-2 convs with leaky relu
  (batch norm on the second) -> dropout -> one logit per example (B,)."""
  image_shape: Sequence[int] = (8, 8, 1)
  num_classes: int = 0
  features: int = 64
  embed_dim: int = 16
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, labels: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    check_image_shape(self.image_shape)
    if self.num_classes > 0:
      emb = nn.Embed(self.num_classes, self.embed_dim)(labels)[:, None, None, :]
      x = jnp.concatenate([x, jnp.broadcast_to(emb, x.shape[:3] + (self.embed_dim,))], -1)
    x = nn.leaky_relu(nn.Conv(self.features, (4, 4), (2, 2))(x), 0.2)
    x = nn.Conv(2 * self.features, (4, 4), (2, 2), use_bias=False)(x)
    x = nn.leaky_relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x), 0.2)
    x = nn.Dropout(self.dropout, deterministic=not train)(x.reshape(x.shape[0], -1))
    return nn.Dense(1)(x)[:, 0]


@MODELS.register("dcgan")
class DCGAN(nn.Module):
  """Generator and discriminator sized for small images (default 8x8x1 digits, standardized,
  so the generator's output is linear: ``output_activation='identity'``).

  ``num_outputs`` is unused (kept first for the model contract; the builder fills it from the
  dataset). ``num_classes > 0`` makes both networks class-conditional (labels are required);
  with 0, labels are ignored. Use ``apply(..., method='generate')`` / ``'discriminate'``;
  ``__call__`` runs both (the generator on a zero latent) so that ``init`` creates every
  variable, and returns the discriminator's logits for ``x``. ``dropout`` is applied in the
  discriminator before its last layer."""
  num_outputs: int
  image_shape: Sequence[int] = (8, 8, 1)
  latent_dim: int = 32
  num_classes: int = 0
  features: int = 64
  embed_dim: int = 16
  output_activation: str = "identity"
  dropout: float = 0.0

  def setup(self):
    self.generator = Generator(tuple(self.image_shape), self.num_classes, self.features,
                               self.embed_dim, self.output_activation)
    self.discriminator = Discriminator(tuple(self.image_shape), self.num_classes,
                                       self.features, self.embed_dim, self.dropout)

  def _labels(self, labels: jax.Array | None) -> jax.Array | None:
    if self.num_classes <= 0:
      return None
    if labels is None:
      raise ConfigError(f"dcgan with num_classes={self.num_classes} needs labels")
    return labels

  def generate(self, z: jax.Array, labels: jax.Array | None = None, *,
               train: bool = False) -> jax.Array:
    """Images (B, H, W, C) from latents ``z`` (B, latent_dim)."""
    return self.generator(z, self._labels(labels), train)

  def discriminate(self, x: jax.Array, labels: jax.Array | None = None, *,
                   train: bool = False) -> jax.Array:
    """One real-vs-fake logit per image: (B,)."""
    return self.discriminator(x, self._labels(labels), train)

  def __call__(self, x: jax.Array, labels: jax.Array | None = None, *,
               train: bool = False) -> jax.Array:
    self.generate(jnp.zeros((x.shape[0], self.latent_dim), x.dtype), labels, train=train)
    return self.discriminate(x, labels, train=train)


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array,
                       kind: str = "non_saturating") -> jax.Array:
  """Scalar D loss. ``'non_saturating'``: mean softplus(-real) + mean softplus(fake) (the
  logistic loss of Goodfellow et al., 2014); ``'hinge'``: mean relu(1 - real) + mean
  relu(1 + fake) (Lim & Ye, 2017)."""
  if kind == "non_saturating":
    return jax.nn.softplus(-real_logits).mean() + jax.nn.softplus(fake_logits).mean()
  if kind == "hinge":
    return jax.nn.relu(1.0 - real_logits).mean() + jax.nn.relu(1.0 + fake_logits).mean()
  raise ConfigError(f"unknown gan loss {kind!r}; known: {', '.join(LOSSES)}")


def generator_loss(fake_logits: jax.Array, kind: str = "non_saturating") -> jax.Array:
  """Scalar G loss. ``'non_saturating'``: mean softplus(-fake) (maximise log D(G(z)));
  ``'hinge'``: -mean fake."""
  if kind == "non_saturating":
    return jax.nn.softplus(-fake_logits).mean()
  if kind == "hinge":
    return -fake_logits.mean()
  raise ConfigError(f"unknown gan loss {kind!r}; known: {', '.join(LOSSES)}")
