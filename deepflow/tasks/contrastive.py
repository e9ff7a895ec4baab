"""Self-supervised contrastive pre-training (SimCLR, Chen et al., 2020), evaluated by a linear
probe on the frozen representations.

Two augmented views of every image are drawn inside the jitted train step, on the device, from
the step's key: the views differ per example and per step, and a resumed run draws the same
ones. (``deepflow.data.augment``'s transforms run on the host and give one view per batch; a
contrastive pair needs two independent views of the same batch.)
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deepflow.data.pipeline import INPUTS, TARGETS
from deepflow.models.contrastive import nt_xent_loss
from deepflow.pytree import cast_floats
from deepflow.registry import ConfigError, TASKS
from deepflow.tasks.base import Task


@TASKS.register("contrastive")
class Contrastive(Task):
  """NT-Xent between the projections of two random views of each image (model
  ``contrastive_cnn``: ``features`` are the representations, ``__call__`` their projections),
  over the 2B views of a batch at ``temperature``. Labels are not used in training.

  A view (``random_views``) is a random affine map of the image (shift up to ``shift`` pixels,
  rotation up to ``rotation`` degrees, zoom 1 +- ``scale``; bilinear, edges extended) plus
  Gaussian noise of std ``noise`` (in the preprocessed units). Train metrics: ``loss`` and
  ``view_accuracy``, how often a view's nearest other view is its partner.

  Eval emits each example's frozen representation and label; ``summarize`` fits a linear probe
  (logistic regression on standardized features) with ``probe_folds``-fold stratified
  cross-validation over the evaluated split, so every example is predicted by a probe that
  never saw it: ``probe_accuracy``. The split's own features are all the loop hands a task, so
  the probe is fitted within it; ``linear_probe`` fits one on a train split's features and
  scores it on another's (the experiment file does, beside a random-encoder baseline)."""

  OPTIONS = {"temperature": 0.5, "shift": 1.0, "rotation": 15.0, "scale": 0.15, "noise": 0.2,
             "probe_folds": 5}
  PER_EXAMPLE_LOSS = False  # NT-Xent compares the views of a batch: no DP-SGD
  NO_BATCH_REGULARIZERS = ": it uses no labels, and mixed images are not views"

  def __init__(self, config, spec):
    super().__init__(config, spec)
    if not hasattr(self.model, "features"):
      raise ConfigError(f"task 'contrastive' needs a model with a 'features' method (its "
                        f"representations), such as 'contrastive_cnn'; got {config.model.name!r}")
    if len(spec.input_shape) != 3:
      raise ConfigError(f"task 'contrastive' augments (H, W, C) images; {config.data.source} "
                        f"gives inputs of shape {tuple(spec.input_shape)}")
    o = self.options
    for key in ("temperature", "shift", "rotation", "scale", "noise"):
      value = o[key]
      if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (
          key == "temperature" and value == 0):
        raise ConfigError(f"task.{key} must be a number {'> 0' if key == 'temperature' else '>= 0'}"
                          f", got {value!r}")
    if not isinstance(o["probe_folds"], int) or o["probe_folds"] < 2:
      raise ConfigError(f"task.probe_folds must be an integer >= 2, got {o['probe_folds']!r}")
    self.view_options = {k: float(o[k]) for k in ("shift", "rotation", "scale", "noise")}

  def num_outputs(self) -> int:
    return self.spec.num_classes or 1  # unused by the contrastive objective

  # -- training ----------------------------------------------------------------------------------

  def loss(self, params, model_state, batch, rng):
    images = batch[INPUTS].astype(jnp.float32)
    first, second, dropout = jax.random.split(rng, 3)
    views = jnp.stack([random_views(images, first, **self.view_options),
                       random_views(images, second, **self.view_options)], axis=1)
    # One pass over both views: batch norm sees all 2B of them, as SimCLR's global batch norm.
    # Interleaved (example i's views are rows 2i, 2i+1), so each device keeps its own examples'
    # views: stacking along the batch would move half of them between devices.
    z, model_state = self.apply(params, model_state, views.reshape(-1, *images.shape[1:]),
                                dropout, train=True)
    z = z.reshape(images.shape[0], 2, -1)
    z1, z2 = z[:, 0], z[:, 1]
    loss = nt_xent_loss(z1, z2, self.options["temperature"])
    return loss, ({"view_accuracy": view_accuracy(z1, z2)}, model_state)

  # -- evaluation --------------------------------------------------------------------------------

  def features(self, params, model_state, inputs: jax.Array) -> jax.Array:
    """The frozen representations of ``inputs`` (eval mode), float32."""
    params, inputs = cast_floats((params, inputs), self.compute_dtype)
    out = self.model.apply({"params": params, **model_state}, inputs, train=False,
                           method="features")
    return out.astype(jnp.float32)

  def eval_outputs(self, params, model_state, batch):
    outputs = {"features": self.features(params, model_state, batch[INPUTS])}
    if self.spec.num_classes:
      outputs["label"] = batch[TARGETS].astype(jnp.int32)
    return outputs

  def summarize(self, outputs):
    features, labels = outputs["features"], outputs.get("label")
    metrics = {"feature_std": float(np.mean(np.std(features, axis=0)))}  # collapse shows as ~0
    if labels is not None:
      metrics["probe_accuracy"] = linear_probe_cv(features, labels, self.options["probe_folds"])
    return metrics


def view_accuracy(z1: jax.Array, z2: jax.Array) -> jax.Array:
  """The fraction of the 2B views whose most cosine-similar other view is their partner
  (blockwise, without concatenating the views: see ``nt_xent_loss`` for why)."""
  def normalize(z):
    z = z.astype(jnp.float32)
    return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)

  z1, z2 = normalize(z1), normalize(z2)
  self_mask = jnp.eye(z1.shape[0], dtype=bool)

  def found(a, b):
    partner = jnp.sum(a * b, axis=-1)
    best_same = jnp.max(jnp.where(self_mask, -jnp.inf, a @ a.T), axis=1)
    return (partner > best_same) & (partner >= jnp.max(a @ b.T, axis=1))

  return 0.5 * (found(z1, z2).mean() + found(z2, z1).mean())


# ------------------------------------------------------------------------------------------------
# Views: random augmentations on the device.
# ------------------------------------------------------------------------------------------------

def random_views(images: jax.Array, rng: jax.Array, *, shift: float = 1.0,
                 rotation: float = 15.0, scale: float = 0.15, noise: float = 0.2) -> jax.Array:
  """One random view of each image (B, H, W, C): an affine map about the centre (shift uniform
  in +-``shift`` pixels per axis, rotation uniform in +-``rotation`` degrees, zoom uniform in
  1 +- ``scale``), resampled bilinearly with the edge pixels extended (so no fill value has to
  match the preprocessed background), plus N(0, ``noise``^2) per value."""
  b, h, w, c = images.shape
  k_angle, k_zoom, k_shift, k_noise = jax.random.split(rng, 4)
  angle = jnp.deg2rad(jax.random.uniform(k_angle, (b,), minval=-rotation, maxval=rotation))
  zoom = jax.random.uniform(k_zoom, (b,), minval=1 - scale, maxval=1 + scale)
  offset = jax.random.uniform(k_shift, (b, 2), minval=-shift, maxval=shift)
  ys, xs = jnp.meshgrid(jnp.arange(h) - (h - 1) / 2, jnp.arange(w) - (w - 1) / 2, indexing="ij")

  def one(image, angle, zoom, offset):
    # Output pixel p samples the input at centre + R(-angle) (p - centre - offset) / zoom.
    y, x = ys - offset[0], xs - offset[1]
    cos, sin = jnp.cos(angle) / zoom, jnp.sin(angle) / zoom
    src = [cos * y - sin * x + (h - 1) / 2, sin * y + cos * x + (w - 1) / 2]
    resample = lambda channel: jax.scipy.ndimage.map_coordinates(  # noqa: E731
        channel, src, order=1, mode="nearest")
    return jax.vmap(resample, in_axes=2, out_axes=2)(image)

  views = jax.vmap(one)(images, angle, zoom, offset)
  return views + noise * jax.random.normal(k_noise, views.shape, views.dtype)


# ------------------------------------------------------------------------------------------------
# Linear probes on frozen features.
# ------------------------------------------------------------------------------------------------

def _probe():
  """Multinomial logistic regression (L2, C=1) on standardized features: scikit-learn's lbfgs
  solves this small convex problem exactly and deterministically."""
  from sklearn.linear_model import LogisticRegression
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))


def linear_probe(train_features: np.ndarray, train_labels: np.ndarray,
                 test_features: np.ndarray, test_labels: np.ndarray) -> float:
  """Accuracy on the test features of a linear probe fitted on the train features."""
  probe = _probe().fit(np.asarray(train_features, np.float64), np.asarray(train_labels))
  return float(np.mean(probe.predict(np.asarray(test_features, np.float64)) ==
                       np.asarray(test_labels)))


def linear_probe_cv(features: np.ndarray, labels: np.ndarray, folds: int = 5) -> float:
  """Cross-validated linear-probe accuracy within one set of features: stratified ``folds``
  (shuffled from seed 0), each example predicted by the probe fitted on the other folds. Fewer
  folds where a class has fewer examples; NaN with fewer than two classes."""
  from sklearn.model_selection import StratifiedKFold, cross_val_predict
  labels = np.asarray(labels).reshape(-1)
  counts = np.unique(labels, return_counts=True)[1]
  folds = min(folds, int(counts.min()))
  if len(counts) < 2 or folds < 2:
    return float("nan")
  cv = StratifiedKFold(folds, shuffle=True, random_state=0)
  predicted = cross_val_predict(_probe(), np.asarray(features, np.float64), labels, cv=cv)
  return float(np.mean(predicted == labels))


def split_features(task: Contrastive, params: Any, model_state: Any,
                   batches: Any) -> tuple[np.ndarray, np.ndarray]:
  """(features, labels) of every real row of ``batches`` (dicts with inputs, targets and the
  pipeline's padding ``mask``, e.g. ``Pipeline.eval_batches(split)``), computed in one jitted
  function."""
  features = jax.jit(task.features)
  chunks = []
  for batch in batches:
    keep = np.asarray(batch.get("mask", np.ones(len(batch[INPUTS])))) > 0
    chunks.append((np.asarray(features(params, model_state, batch[INPUTS]))[keep],
                   np.asarray(batch[TARGETS])[keep]))
  return np.concatenate([f for f, _ in chunks]), np.concatenate([y for _, y in chunks])
