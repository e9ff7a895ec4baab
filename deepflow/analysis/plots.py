"""Image grids as PNGs: attribution heatmaps (each input above its signed attribution map) and
generated images (``deepflow sample`` of a GAN).

Uses matplotlib's Agg canvas on a bare ``Figure`` (no pyplot), so it works headless and never
touches the process-wide backend or pyplot's figure registry.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from deepflow.registry import ConfigError

# Diverging map centred on white, with limits symmetric about 0, so colour means sign.
_CMAP = "RdBu_r"


def _square_shape(size: int) -> tuple[int, int] | None:
  """(h, w) with h * w == size and h the largest divisor <= sqrt(size), if not too elongated."""
  h = max(d for d in range(1, math.isqrt(size) + 1) if size % d == 0)
  w = size // h
  return (h, w) if size >= 16 and w <= 4 * h else None


def _as_images(inputs: np.ndarray, attributions: np.ndarray,
               vector_layout: str) -> tuple[np.ndarray, np.ndarray, bool]:
  """(display inputs, 2-D heatmaps or 1-D vectors, as_bars) for one consistent layout."""
  if inputs.ndim == 2:
    shape = _square_shape(inputs.shape[1]) if vector_layout in ("auto", "square") else None
    if vector_layout == "square" and shape is None:
      raise ConfigError(f"cannot reshape {inputs.shape[1]} features to a near-square image; "
                        f"use vector_layout='bars'")
    if shape is None:
      return inputs, attributions, True
    return inputs.reshape(-1, *shape), attributions.reshape(-1, *shape), False
  if inputs.ndim == 3:  # (B, H, W) images without a channel axis
    return inputs, attributions, False
  if inputs.ndim == 4:  # NHWC: show RGB as is, other channel counts averaged; heatmaps averaged
    shown = inputs if inputs.shape[-1] == 3 else inputs.mean(axis=-1)
    return shown, attributions.mean(axis=-1), False
  raise ConfigError(f"cannot plot inputs of shape {inputs.shape}; expected (B, D), (B, H, W) "
                    f"or (B, H, W, C)")


def _normalise(image: np.ndarray) -> np.ndarray:
  """Scales an image to [0, 1] for display (inputs are often standardised, not pixels)."""
  lo, hi = float(image.min()), float(image.max())
  return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)


def save_attribution_grid(path: str | os.PathLike, inputs, attributions,
                          labels: Sequence[object] | None = None, ncols: int = 8, *,
                          vector_layout: str = "auto", title: str | None = None) -> str:
  """Writes a PNG: inputs in one row, their signed attribution heatmaps in the row below.

  More than ``ncols`` examples wrap onto further (input, heatmap) row pairs. NHWC images are
  shown as RGB (or grey) with channel-averaged heatmaps; flat vectors (B, D) become near-square
  images when D factors nicely, else bar charts (``vector_layout``: 'auto', 'square' or 'bars').
  Each heatmap has its own symmetric colour limits ``[-max|a|, max|a|]``. ``labels`` (one per
  example) become titles. Returns the path written.
  """
  inputs = np.asarray(inputs, np.float32)
  attributions = np.asarray(attributions, np.float32)
  if inputs.shape != attributions.shape:
    raise ConfigError(f"inputs {inputs.shape} and attributions {attributions.shape} must have the "
                      f"same shape")
  if vector_layout not in ("auto", "square", "bars"):
    raise ConfigError(f"unknown vector_layout {vector_layout!r}; use 'auto', 'square' or 'bars'")
  if ncols < 1:
    raise ConfigError(f"ncols must be >= 1; got {ncols}")
  n = inputs.shape[0]
  if labels is not None and len(labels) != n:
    raise ConfigError(f"got {len(labels)} labels for {n} examples")
  shown, heat, as_bars = _as_images(inputs, attributions, vector_layout)

  cols = min(ncols, n)
  row_pairs = math.ceil(n / cols)
  size = (2.6, 1.6) if as_bars else (1.8, 1.8)
  fig = Figure(figsize=(size[0] * cols, size[1] * 2 * row_pairs + (0.4 if title else 0)),
               layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(2 * row_pairs, cols, squeeze=False)
  for ax in axes.flat:
    ax.set_axis_off()
  for i in range(n):
    top, bottom = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
    limit = float(np.abs(heat[i]).max()) or 1.0
    if as_bars:
      top.set_axis_on()
      bottom.set_axis_on()
      features = np.arange(shown.shape[1])
      top.bar(features, shown[i], color="0.4", width=1.0)
      bottom.bar(features, heat[i], width=1.0,
                 color=np.where(heat[i] >= 0, "tab:red", "tab:blue"))
      bottom.set_ylim(-1.05 * limit, 1.05 * limit)
      bottom.axhline(0.0, color="black", linewidth=0.5)
      for ax in (top, bottom):
        ax.tick_params(labelsize=6)
    else:
      image = _normalise(shown[i])
      top.imshow(image, cmap=None if image.ndim == 3 else "gray", interpolation="nearest")
      bottom.imshow(heat[i], cmap=_CMAP, vmin=-limit, vmax=limit, interpolation="nearest")
    if labels is not None:
      top.set_title(str(labels[i]), fontsize=8)
  if title:
    fig.suptitle(title)
  fig.savefig(path, format="png", dpi=100)
  return os.fspath(path)


def save_image_grid(path: str | os.PathLike, images: np.ndarray,
                    labels: Sequence[int] | None = None, *, title: str | None = None) -> str:
  """Writes images (N, H, W, C) as one PNG mosaic: with ``labels``, one row per class (labelled
  on the left), else a near-square grid. Values are scaled to [0, 1] over the whole grid, from
  its 0.5th to its 99.5th percentile (the images are in preprocessed units), so intensities stay
  comparable between cells.
  """
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ConfigError(f"an image grid needs (N, H, W, C) images, got shape {images.shape}")
  lo, hi = (float(v) for v in np.percentile(images, [0.5, 99.5]))  # outliers can't grey it all
  images = np.clip((images - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(images)

  if images.shape[-1] not in (1, 3):  # neither grey nor RGB: show the channel mean
    images = images.mean(-1, keepdims=True)
  if labels is not None:
    labels = np.asarray(labels)
    rows = [images[labels == c] for c in np.unique(labels)]
    row_names = [str(c) for c in np.unique(labels)]
  else:
    cols = math.ceil(math.sqrt(len(images)))
    rows = [images[i:i + cols] for i in range(0, len(images), cols)]
    row_names = None
  n, (h, w, c) = max(len(r) for r in rows), images.shape[1:]
  gap = 1
  mosaic = np.ones((len(rows) * (h + gap) - gap, n * (w + gap) - gap, c), np.float32)
  for i, row in enumerate(rows):
    for j, image in enumerate(row):
      mosaic[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = image
  scale = min(0.25, 8.0 / max(mosaic.shape[:2]))  # inches per pixel: about 8 inches across
  fig = Figure(figsize=(mosaic.shape[1] * scale + 0.6, mosaic.shape[0] * scale + 0.6),
               layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  ax.imshow(mosaic[..., 0] if c == 1 else mosaic, cmap="gray", vmin=0.0, vmax=1.0,
            interpolation="nearest")
  ax.set_xticks([])
  if row_names is not None:
    ax.set_yticks([i * (h + gap) + (h - 1) / 2 for i in range(len(rows))], row_names)
    ax.set_ylabel("class")
  else:
    ax.set_yticks([])
  if title:
    ax.set_title(title, fontsize=9)
  fig.savefig(path, format="png", dpi=100)
  return os.fspath(path)
