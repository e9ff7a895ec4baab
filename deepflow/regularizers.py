"""Regularizers, named in ``config.regularizers`` (a list of dicts with a 'name').

Like an optax transformation, each regularizer is one small record of optional hooks, and a list of
them combines into one record (``build_regularizers``), so they compose in any number:

- ``batch(batch, rng, num_classes) -> batch``: train step only, before the loss (label smoothing,
  mixup, cutmix; crops and flips on the device). Classification targets become soft (B, C) class
  probabilities.
- ``penalty(params) -> scalar``: added to the training loss (l1, l2 on parameters chosen by regex).
- ``gradient``: an optax transformation on the raw gradients, first in the optimizer chain after
  clipping (gradient noise).
- ``projection``: an optax transformation last in the optimizer chain that moves the updated
  parameters onto a constraint set (max-norm, pruning's masks).
- ``metrics(params) -> dict``: values of the updated parameters added to the train step's
  metrics (pruning's sparsity per layer).

``early_stopping`` is listed here too, but it is a policy of the training loop, not of the step:
it lives in ``deepflow.train.early_stopping``, which registers it.

Three regularizers are options of other sections, not entries here: dropout is every model's
``model.dropout``; decoupled weight decay is ``optimizer.weight_decay`` (masked by the regex
``optimizer.weight_decay_mask``); stochastic depth is the resnet model's
``model.stochastic_depth``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from deepflow import pruning as pruning_lib
from deepflow.data import augment
from deepflow.data.pipeline import INPUTS, TARGETS
from deepflow.pytree import Selector, path_name
from deepflow.registry import ConfigError, REGULARIZERS, check_non_negative
from deepflow.train import early_stopping  # registers 'early_stopping', the loop's policy

Batch = Mapping[str, jax.Array]
BatchFn = Callable[[Batch, jax.Array, "int | None"], Batch]


@dataclasses.dataclass(frozen=True)
class Regularizer:
  """One regularizer's hooks (see the module docstring); ``None`` means it has none there."""
  batch: BatchFn | None = None
  penalty: Callable[[Any], jax.Array] | None = None
  gradient: optax.GradientTransformation | None = None
  projection: optax.GradientTransformation | None = None
  metrics: Callable[[Any], dict[str, jax.Array]] | None = None
  # The parameter selections the hooks make, checked against the model once it is built.
  selectors: tuple[Selector, ...] = ()


def build_regularizers(entries: Sequence[Mapping[str, Any]]) -> Regularizer:
  """The regularizers a config lists, built from the registry and combined into one. The loop's
  policies listed there too (``early_stopping``: ``deepflow.train.early_stopping``) are built,
  so their options are checked, and left to the loop."""
  parts = []
  for entry in entries:
    options = {k: v for k, v in dict(entry).items() if k != "name"}
    factory = REGULARIZERS.get(entry["name"])
    try:
      part = factory(**options)
    except TypeError as e:
      raise ConfigError(f"regularizer {entry['name']!r}: {e}") from e
    if isinstance(part, Regularizer):
      parts.append(part)
  early_stopping.from_config(entries)  # listed at most once
  return combine(parts)


def combine(parts: Sequence[Regularizer]) -> Regularizer:
  """One regularizer doing what ``parts`` do, in list order (batch hooks and transformations)."""
  batch_fns = [p.batch for p in parts if p.batch]
  penalties = [p.penalty for p in parts if p.penalty]
  gradients = [p.gradient for p in parts if p.gradient]
  projections = [p.projection for p in parts if p.projection]
  metric_fns = [p.metrics for p in parts if p.metrics]

  def batch(b, rng, num_classes):
    for i, fn in enumerate(batch_fns):
      b = fn(b, jax.random.fold_in(rng, i), num_classes)
    return b

  def penalty(params):
    return sum(fn(params) for fn in penalties)

  def metrics(params):
    return {k: v for fn in metric_fns for k, v in fn(params).items()}

  return Regularizer(
      batch=batch if batch_fns else None,
      penalty=penalty if penalties else None,
      gradient=optax.chain(*gradients) if gradients else None,
      projection=optax.chain(*projections) if projections else None,
      metrics=metrics if metric_fns else None,
      selectors=tuple(s for p in parts for s in p.selectors))


def _register(name: str):
  return REGULARIZERS.register(name)


def _non_negative(name: str, **values: float) -> None:
  check_non_negative(f"regularizer {name!r}", **values)


def _selector(name: str, pattern: str) -> Selector:
  """The parameters a regularizer's ``params`` regex selects."""
  return Selector(pattern, f"regularizer {name!r}: params")


# ------------------------------------------------------------------------------------------------
# Loss penalties.
# ------------------------------------------------------------------------------------------------

@_register("l2")
def l2(amount: float, params: str = r"kernel$") -> Regularizer:
  """``amount * sum(w ** 2)`` over the parameters whose path matches ``params`` (default: every
  weight matrix, no biases). Coupled to the loss, unlike ``optimizer.weight_decay``."""
  _non_negative("l2", amount=amount)
  select = _selector("l2", params)
  return Regularizer(penalty=lambda p: amount * sum(jnp.sum(jnp.square(x))
                                                    for x in select.leaves(p)),
                     selectors=(select,))


@_register("l1")
def l1(amount: float, params: str = r"kernel$") -> Regularizer:
  """``amount * sum(|w|)`` over the parameters whose path matches ``params`` (sparsity)."""
  _non_negative("l1", amount=amount)
  select = _selector("l1", params)
  return Regularizer(penalty=lambda p: amount * sum(jnp.sum(jnp.abs(x)) for x in select.leaves(p)),
                     selectors=(select,))


# ------------------------------------------------------------------------------------------------
# Target and batch changes (training batches only).
# ------------------------------------------------------------------------------------------------

def soft_targets(targets: jax.Array, num_classes: int | None) -> jax.Array:
  """Integer labels -> one-hot float rows; soft (B, C) targets and real targets pass through."""
  if num_classes and jnp.issubdtype(targets.dtype, jnp.integer):
    return jax.nn.one_hot(targets, num_classes, dtype=jnp.float32)
  return targets.astype(jnp.float32)


@_register("label_smoothing")
def label_smoothing(amount: float = 0.1) -> Regularizer:
  """Soft targets ``(1 - amount) * onehot + amount / num_classes`` (Szegedy et al., 2016)."""
  _non_negative("label_smoothing", amount=amount)
  if amount > 1:
    raise ConfigError(f"regularizer 'label_smoothing': amount must be <= 1, got {amount}")

  def batch(b, rng, num_classes):
    if not num_classes:
      raise ConfigError("regularizer 'label_smoothing' needs a classification task")
    return {**b, TARGETS: optax.smooth_labels(soft_targets(b[TARGETS], num_classes), amount)}
  return Regularizer(batch=batch)


def _mix_ratio(rng: jax.Array, alpha: float) -> jax.Array:
  """lambda ~ Beta(alpha, alpha): one mixing ratio per batch, as in the mixup paper's code."""
  return jax.random.beta(rng, alpha, alpha)


@_register("mixup")
def mixup(alpha: float = 0.2) -> Regularizer:
  """Mixup (Zhang et al., 2018): with lambda ~ Beta(alpha, alpha) and a random permutation
  ``p`` of the batch, ``x = lambda x + (1 - lambda) x[p]`` and the same for the (soft) targets."""
  _non_negative("mixup", alpha=alpha)
  if alpha <= 0:
    raise ConfigError("regularizer 'mixup': alpha must be > 0")

  def batch(b, rng, num_classes):
    ratio_rng, perm_rng = jax.random.split(rng)
    lam = _mix_ratio(ratio_rng, alpha)
    perm = jax.random.permutation(perm_rng, b[INPUTS].shape[0])
    x, y = b[INPUTS].astype(jnp.float32), soft_targets(b[TARGETS], num_classes)
    return {**b, INPUTS: lam * x + (1 - lam) * x[perm], TARGETS: lam * y + (1 - lam) * y[perm]}
  return Regularizer(batch=batch)


@_register("cutmix")
def cutmix(alpha: float = 1.0) -> Regularizer:
  """CutMix (Yun et al., 2019) on (B, H, W, C) images: a box of area ``(1 - lambda) H W``
  (lambda ~ Beta(alpha, alpha), centre uniform, clipped at the border) is pasted from the
  permuted batch; targets mix by the box's actual area fraction."""
  _non_negative("cutmix", alpha=alpha)
  if alpha <= 0:
    raise ConfigError("regularizer 'cutmix': alpha must be > 0")

  def batch(b, rng, num_classes):
    x = b[INPUTS]
    if x.ndim != 4:
      raise ConfigError(f"regularizer 'cutmix' needs (B, H, W, C) images, got shape {x.shape}")
    ratio_rng, perm_rng, y_rng, x_rng = jax.random.split(rng, 4)
    height, width = x.shape[1], x.shape[2]
    lam = _mix_ratio(ratio_rng, alpha)
    cut = jnp.sqrt(1.0 - lam)
    cy = jax.random.uniform(y_rng) * height
    cx = jax.random.uniform(x_rng) * width
    top = jnp.clip(jnp.round(cy - cut * height / 2), 0, height)
    bottom = jnp.clip(jnp.round(cy + cut * height / 2), 0, height)
    left = jnp.clip(jnp.round(cx - cut * width / 2), 0, width)
    right = jnp.clip(jnp.round(cx + cut * width / 2), 0, width)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    perm = jax.random.permutation(perm_rng, x.shape[0])
    mixed = jnp.where(box[None, :, :, None], x[perm], x)
    kept = 1.0 - (bottom - top) * (right - left) / (height * width)
    y = soft_targets(b[TARGETS], num_classes)
    return {**b, INPUTS: mixed, TARGETS: kept * y + (1 - kept) * y[perm]}
  return Regularizer(batch=batch)


def _device_images(name: str, x: jax.Array) -> None:
  if x.ndim != 4:
    raise ConfigError(f"regularizer {name!r} needs (B, H, W, C) images, got shape {x.shape}")


@_register("device_crop")
def device_crop(padding: int = 4) -> Regularizer:
  """Random crops inside the jitted train step (the host does no augmentation work): each image
  is zero-padded by ``padding`` pixels and cropped back at a uniformly random offset drawn from
  the step's RNG. ``data.transforms``' ``random_crop`` does the same on the host."""
  _non_negative("device_crop", padding=padding)

  def batch(b, rng, num_classes):
    x = b[INPUTS]
    _device_images("device_crop", x)
    offsets = jax.random.randint(rng, (x.shape[0], 2), 0, 2 * padding + 1)
    return {**b, INPUTS: augment.crop_images(x, offsets[:, 0], offsets[:, 1], padding)}
  return Regularizer(batch=batch)


@_register("device_flip")
def device_flip(probability: float = 0.5) -> Regularizer:
  """Horizontal flips inside the jitted train step: each image mirrored left-right with
  ``probability``, drawn from the step's RNG (``data.transforms``' ``flip`` on the host)."""
  _non_negative("device_flip", probability=probability)

  def batch(b, rng, num_classes):
    x = b[INPUTS]
    _device_images("device_flip", x)
    chosen = jax.random.bernoulli(rng, probability, (x.shape[0],))
    return {**b, INPUTS: augment.flip_images(x, chosen, 2)}
  return Regularizer(batch=batch)


# ------------------------------------------------------------------------------------------------
# Optimizer-side: gradient noise and max-norm constraints.
# ------------------------------------------------------------------------------------------------

@_register("gradient_noise")
def gradient_noise(eta: float = 0.01, gamma: float = 0.55, seed: int = 0) -> Regularizer:
  """Gaussian noise of variance ``eta / t ** gamma`` (t = 1, 2, ...) added to the gradients
  (Neelakantan et al., 2015), after clipping; optax.add_noise keeps its key in the optimizer
  state, so a resumed run draws the same noise."""
  _non_negative("gradient_noise", eta=eta, gamma=gamma)
  return Regularizer(gradient=optax.add_noise(eta, gamma, key=seed))


def max_norm_projection(limit: float, select: Selector) -> optax.GradientTransformation:
  """Changes the final updates so that every matched kernel's incoming weight vector of each
  unit (all axes but the last) has L2 norm <= ``limit`` after the update is applied.

  Written here because optax's projections act on whole trees or arrays, not per unit."""
  def project(path, update, param):
    if not select(path_name(path)) or param.ndim < 2:
      return update
    new = param + update
    norms = jnp.sqrt(jnp.sum(jnp.square(new), axis=tuple(range(new.ndim - 1)), keepdims=True))
    scale = jnp.minimum(1.0, limit / jnp.maximum(norms, 1e-12))
    return (new * scale - param).astype(update.dtype)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("max_norm needs the parameters in the optimizer update")
    return jax.tree_util.tree_map_with_path(project, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


@_register("max_norm")
def max_norm(limit: float = 3.0, params: str = r"kernel$") -> Regularizer:
  """Max-norm constraint (Srebro et al., 2005; used with dropout by Srivastava et al., 2014):
  after every update, each unit's incoming weights (a kernel's column) are rescaled to L2 norm
  ``limit`` if longer. ``params`` selects the kernels by regex."""
  _non_negative("max_norm", limit=limit)
  select = _selector("max_norm", params)
  return Regularizer(projection=max_norm_projection(limit, select), selectors=(select,))


@_register("pruning")
def pruning(sparsity: float, end_step: int, start_step: int = 0, frequency: int = 100,
            initial_sparsity: float = 0.0, power: float = 3.0,
            params: str = r"kernel$") -> Regularizer:
  """Magnitude pruning (Zhu & Gupta, 2017; ``deepflow.pruning``): the kernels ``params`` selects
  reach ``sparsity`` (a fraction of exact zeros per array, in [0, 1)) at ``end_step`` on the
  polynomial schedule from ``initial_sparsity`` at ``start_step``, masks recomputed every
  ``frequency`` steps and applied after every update; the train metrics report each layer's
  ``sparsity/NAME``. Last in the chain: a ``optimizer.lr_multipliers`` factor scales the
  masking update of the step that prunes a weight, which is then zeroed at the next step."""
  schedule = pruning_lib.Schedule(sparsity, start_step, end_step, frequency, initial_sparsity,
                                  power)
  select = _selector("pruning", params)
  return Regularizer(projection=pruning_lib.pruning(schedule, select),
                     metrics=lambda p: pruning_lib.layer_sparsity(p, select),
                     selectors=(select,))
