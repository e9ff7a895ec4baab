"""Data augmentation: random transforms of training batches, listed in ``data.transforms``.

Each is a ``Transform`` with ``train_only=True``: the pipeline applies it to training batches
only, after the fitted transforms before it in the list (so list it after ``standardize`` to
augment standardized values). Randomness comes from the generator the pipeline passes in,
``np.random.default_rng([seed, step, 0])``: batch ``s`` is augmented the same way in every run
and after every resumption. Everything is vectorized over the batch in numpy on the host, where
it overlaps the train step (Grain's reader threads); for small images that is cheaper than a
device round trip.

Images are (B, H, W, C); sequences are (B, T) or (B, T, C).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from deepflow.data.transforms import Transform
from deepflow.registry import ConfigError, TRANSFORMS, check_non_negative


def _augmentation(fn, keys: tuple[str, ...]) -> Transform:
  """A train-only transform from ``fn(values, rng) -> values`` (nothing to fit)."""
  return Transform(fit=lambda values: {}, apply=lambda stats, values, rng: fn(values, rng),
                   keys=tuple(keys), train_only=True)


def _check(name: str, **values: float) -> None:
  check_non_negative(f"transform {name!r}", **values)


def _images(name: str, values: np.ndarray) -> None:
  if values.ndim != 4:
    raise ConfigError(f"transform {name!r} needs (B, H, W, C) images, got shape {values.shape}")


# ------------------------------------------------------------------------------------------------
# Images.
# ------------------------------------------------------------------------------------------------

def crop_images(x, dy, dx, padding: int, mode: str = "constant"):
  """Each (H, W, C) image of ``x`` padded by ``padding`` pixels (``mode`` as in numpy.pad) and
  cropped back to its size at the offset ``(dy[i], dx[i])``. One implementation for numpy arrays
  on the host (``random_crop``) and JAX arrays inside the train step (the ``device_crop``
  regularizer); only where the offsets are drawn differs."""
  xp = np if isinstance(x, np.ndarray) else jnp
  b, h, w, _ = x.shape
  padded = xp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), mode=mode)
  rows = dy[:, None] + xp.arange(h)[None, :]           # (B, H)
  cols = dx[:, None] + xp.arange(w)[None, :]           # (B, W)
  return padded[xp.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def flip_images(x, chosen, axis: int):
  """The images of ``x`` with ``chosen[i]`` true mirrored along ``axis`` (2: left-right, 1:
  top-bottom); numpy or JAX arrays alike (``flip`` and the ``device_flip`` regularizer)."""
  xp = np if isinstance(x, np.ndarray) else jnp
  return xp.where(xp.reshape(chosen, (-1, 1, 1, 1)), xp.flip(x, axis), x)


@TRANSFORMS.register("random_crop")
def random_crop(padding: int = 2, mode: str = "constant",
                keys: tuple[str, ...] = ("input",)) -> Transform:
  """Pads each image by ``padding`` pixels (``mode``: numpy.pad's 'constant' (zeros), 'edge' or
  'reflect') and crops it back to its size at a uniformly random offset (per example)."""
  _check("random_crop", padding=padding)
  if mode not in ("constant", "edge", "reflect"):
    raise ConfigError(f"transform 'random_crop': mode {mode!r}; known: constant, edge, reflect")

  def crop(x, rng):
    _images("random_crop", x)
    dy = rng.integers(0, 2 * padding + 1, x.shape[0])
    dx = rng.integers(0, 2 * padding + 1, x.shape[0])
    return crop_images(x, dy, dx, padding, mode)
  return _augmentation(crop, keys)


@TRANSFORMS.register("flip")
def flip(horizontal: bool = True, vertical: bool = False, probability: float = 0.5,
         keys: tuple[str, ...] = ("input",)) -> Transform:
  """Mirrors each image left-right (and/or top-bottom) with ``probability``, per example.
  Not for digits or text, whose classes are not mirror-symmetric."""
  _check("flip", probability=probability)

  def apply(x, rng):
    _images("flip", x)
    out = x
    for axis, on in ((2, horizontal), (1, vertical)):
      if on:
        out = flip_images(out, rng.random(x.shape[0]) < probability, axis)
    return out
  return _augmentation(apply, keys)


@TRANSFORMS.register("affine")
def affine(rotation: float = 10.0, translation: float = 0.0, scale: float = 0.0,
           fill: float = 0.0, keys: tuple[str, ...] = ("input",)) -> Transform:
  """A random small affine map per image about its centre: rotation uniform in +-``rotation``
  degrees, shift uniform in +-``translation`` (a fraction of the size), zoom uniform in
  1 +- ``scale``; bilinear resampling (scipy.ndimage), ``fill`` outside the image."""
  _check("affine", rotation=rotation, translation=translation, scale=scale)

  def apply(x, rng):
    from scipy import ndimage
    _images("affine", x)
    b, h, w, c = x.shape
    angle = np.deg2rad(rng.uniform(-rotation, rotation, b))
    zoom = rng.uniform(1 - scale, 1 + scale, b)
    shift = rng.uniform(-translation, translation, (b, 2)) * np.array([h, w])
    # Output pixel p samples the input at centre + R(-angle) (p - centre - shift) / zoom.
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    ys, xs = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2, indexing="ij")
    ys = ys[None] - shift[:, 0, None, None]
    xs = xs[None] - shift[:, 1, None, None]
    src_y = cos[:, None, None] * ys - sin[:, None, None] * xs + (h - 1) / 2
    src_x = sin[:, None, None] * ys + cos[:, None, None] * xs + (w - 1) / 2
    coords = np.stack([
        np.broadcast_to(np.arange(b)[:, None, None, None], (b, h, w, c)),
        np.broadcast_to(src_y[..., None], (b, h, w, c)),
        np.broadcast_to(src_x[..., None], (b, h, w, c)),
        np.broadcast_to(np.arange(c), (b, h, w, c))])
    return ndimage.map_coordinates(x, coords, order=1, mode="constant",
                                   cval=fill).astype(np.float32)
  return _augmentation(apply, keys)


@TRANSFORMS.register("rotate")
def rotate(degrees: float = 10.0, fill: float = 0.0,
           keys: tuple[str, ...] = ("input",)) -> Transform:
  """A random rotation uniform in +-``degrees`` (``affine`` with rotation only)."""
  return affine(rotation=degrees, fill=fill, keys=keys)


@TRANSFORMS.register("brightness_contrast")
def brightness_contrast(brightness: float = 0.1, contrast: float = 0.1,
                        keys: tuple[str, ...] = ("input",)) -> Transform:
  """Per image: ``(x - mean) * c + mean + b`` with contrast factor c uniform in 1 +- ``contrast``
  and brightness shift b uniform in +-``brightness`` (in the units of x at this point)."""
  _check("brightness_contrast", brightness=brightness, contrast=contrast)

  def apply(x, rng):
    _images("brightness_contrast", x)
    b = x.shape[0]
    factor = rng.uniform(1 - contrast, 1 + contrast, (b, 1, 1, 1))
    shift = rng.uniform(-brightness, brightness, (b, 1, 1, 1))
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return ((x - mean) * factor + mean + shift).astype(np.float32)
  return _augmentation(apply, keys)


@TRANSFORMS.register("gaussian_noise")
def gaussian_noise(std: float = 0.05, keys: tuple[str, ...] = ("input",)) -> Transform:
  """Adds independent N(0, std^2) noise to every value (images or features)."""
  _check("gaussian_noise", std=std)
  return _augmentation(
      lambda x, rng: (x + rng.normal(0.0, std, x.shape)).astype(np.float32), keys)


# ------------------------------------------------------------------------------------------------
# Sequences (time series): Um et al. (2017) and Le Guennec et al. (2016).
# ------------------------------------------------------------------------------------------------

@TRANSFORMS.register("jitter")
def jitter(std: float = 0.03, keys: tuple[str, ...] = ("input",)) -> Transform:
  """Sequence jitter: independent N(0, std^2) noise at every time step and channel."""
  return gaussian_noise(std, keys)


@TRANSFORMS.register("scaling")
def scaling(std: float = 0.1, keys: tuple[str, ...] = ("input",)) -> Transform:
  """Multiplies each sequence's channels by factors drawn from N(1, std^2), one per example
  and channel, constant over time."""
  _check("scaling", std=std)

  def apply(x, rng):
    channels = x.shape[-1] if x.ndim > 2 else 1
    factors = rng.normal(1.0, std, (x.shape[0],) + (1,) * (x.ndim - 2) + (channels,))
    return (x * factors).astype(np.float32)
  return _augmentation(apply, keys)


@TRANSFORMS.register("window_slice")
def window_slice(ratio: float = 0.9, keys: tuple[str, ...] = ("input",)) -> Transform:
  """Window slicing: a random window of ``ratio`` of each sequence's length (start uniform) is
  stretched back to the full length by linear interpolation."""
  if not 0 < ratio <= 1:
    raise ConfigError(f"transform 'window_slice': ratio must be in (0, 1], got {ratio}")

  def apply(x, rng):
    if x.ndim not in (2, 3):
      raise ConfigError(f"transform 'window_slice' needs (B, T) or (B, T, C) sequences, got "
                        f"shape {x.shape}")
    seq = x if x.ndim == 3 else x[..., None]
    b, t, _ = seq.shape
    span = ratio * (t - 1)
    start = rng.uniform(0, (t - 1) - span, b)
    pos = start[:, None] + np.linspace(0.0, span, t)[None, :]   # (B, T) source positions
    lo = np.clip(np.floor(pos).astype(int), 0, t - 1)
    hi = np.minimum(lo + 1, t - 1)
    frac = (pos - lo)[..., None]
    rows = np.arange(b)[:, None]
    out = seq[rows, lo] * (1 - frac) + seq[rows, hi] * frac
    return out.reshape(x.shape).astype(np.float32)
  return _augmentation(apply, keys)
