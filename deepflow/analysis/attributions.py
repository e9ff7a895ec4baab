"""Feature attributions: which input features drive a model's prediction for a target class.

Every method has the signature ``method(fn, inputs, targets, **options) -> attributions`` with
``attributions.shape == inputs.shape``. ``fn(x_batch) -> logits (B, C)`` is any pure function
(e.g. ``lambda x: model.apply(variables, x)``); the attributed scalar is each example's
target-class logit. ``targets=None`` attributes the predicted (argmax) class.

The methods assume examples do not interact inside ``fn`` (no batch norm in training mode), so
the gradient of the summed target logits is each example's own gradient.

All methods are pure JAX and trace under ``jax.jit``; options (``steps``, ``patch``, ...) are
Python values fixed at trace time. They are not jitted here because closing over ``fn`` would
bake the model's parameters into the program as constants; jit at the call site instead, with
the parameters as an argument::

  explain = jax.jit(lambda v, x, t: integrated_gradients(lambda x: model.apply(v, x), x, t))

``METHODS`` maps names to methods and ``attribute(name, ...)`` dispatches, so a config or the CLI
can say ``'integrated_gradients'``.
"""
from __future__ import annotations

import inspect
import itertools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from deepflow.registry import ConfigError, Registry

LogitFn = Callable[[jax.Array], jax.Array]
Method = Callable[..., jax.Array]

METHODS: Registry[Method] = Registry("attribution method")


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------

def _as_float(inputs: jax.Array) -> jax.Array:
  """Inputs as a floating array: gradients of integer pixels (uint8 images) are undefined."""
  x = jnp.asarray(inputs)
  return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def _target_logits(fn: LogitFn, x: jax.Array, targets: jax.Array) -> jax.Array:
  """Each example's target-class logit, shape (B,)."""
  logits = fn(x)
  if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
    raise ConfigError(f"fn must map a batch of {x.shape[0]} inputs to logits (B, C); "
                      f"got shape {tuple(logits.shape)}")
  return jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]


def _targets(fn: LogitFn, x: jax.Array, targets: jax.Array | None) -> jax.Array:
  """The classes to attribute: given ones, or the model's prediction when ``targets`` is None."""
  if targets is None:
    return jnp.argmax(fn(x), axis=-1)
  targets = jnp.asarray(targets, jnp.int32)
  if targets.shape != (x.shape[0],):
    raise ConfigError(f"targets must have shape ({x.shape[0]},) (one class per example); "
                      f"got {tuple(targets.shape)}")
  return targets


def _input_gradient(fn: LogitFn, targets: jax.Array) -> Callable[[jax.Array], jax.Array]:
  """x -> d(target logit)/dx per example (examples are independent, so grad of the sum)."""
  return jax.grad(lambda x: jnp.sum(_target_logits(fn, x, targets)))


def _check_positive_int(name: str, value: int) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise ConfigError(f"{name} must be a positive integer; got {value!r}")
  return int(value)


def _weighted_sum(f: Callable[[jax.Array], jax.Array], points: jax.Array, weights: jax.Array,
                  init: jax.Array, chunk_size: int) -> jax.Array:
  """``init + sum_k weights[k] * f(points[k])``, evaluated ``chunk_size`` points at a time.

  ``jax.vmap`` inside a chunk keeps the device busy; ``lax.scan`` over chunks keeps memory at
  ``chunk_size`` evaluations instead of all of them. The last chunk is padded with copies of a
  real point at weight 0, so padding never injects NaNs.
  """
  n = points.shape[0]
  chunk = min(chunk_size, n)
  num_chunks = math.ceil(n / chunk)
  pad = num_chunks * chunk - n
  if pad:
    points = jnp.concatenate([points, jnp.repeat(points[-1:], pad, axis=0)])
    weights = jnp.concatenate([weights, jnp.zeros((pad,), weights.dtype)])
  points = points.reshape(num_chunks, chunk, *points.shape[1:])
  weights = weights.reshape(num_chunks, chunk).astype(init.dtype)

  def body(acc, xs):
    pts, ws = xs
    return acc + jnp.tensordot(ws, jax.vmap(f)(pts), axes=1), None

  total, _ = jax.lax.scan(body, init, (points, weights))
  return total


# ----------------------------------------------------------------------------------------------
# Gradient methods
# ----------------------------------------------------------------------------------------------

@METHODS.register("saliency")
def saliency(fn: LogitFn, inputs: jax.Array, targets: jax.Array | None = None) -> jax.Array:
  """Vanilla gradient of the target logit w.r.t. the input (Simonyan et al., 2014); signed."""
  x = _as_float(inputs)
  return _input_gradient(fn, _targets(fn, x, targets))(x)


@METHODS.register("gradient_x_input")
def gradient_x_input(fn: LogitFn, inputs: jax.Array,
                     targets: jax.Array | None = None) -> jax.Array:
  """Gradient times input: a first-order estimate of each feature's contribution vs. zero."""
  x = _as_float(inputs)
  return x * _input_gradient(fn, _targets(fn, x, targets))(x)


def _baseline(baseline: str | jax.Array, x: jax.Array) -> jax.Array:
  if isinstance(baseline, str):
    if baseline == "zeros":
      return jnp.zeros_like(x)
    if baseline == "mean":
      # Per-feature mean over the batch: a "typical input" reference (a batch of one gives x).
      return jnp.broadcast_to(jnp.mean(x, axis=0, keepdims=True), x.shape)
    raise ConfigError(f"unknown baseline {baseline!r}; use 'zeros', 'mean' or an array")
  b = jnp.asarray(baseline, x.dtype)
  try:
    return jnp.broadcast_to(b, x.shape)
  except ValueError:
    raise ConfigError(f"baseline of shape {tuple(b.shape)} does not broadcast to inputs "
                      f"{tuple(x.shape)}") from None


def _quadrature(steps: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
  """Points in [0, 1] and weights for the path integral (weights sum to 1)."""
  if rule == "trapezoid":
    alphas = np.linspace(0.0, 1.0, steps + 1)
    weights = np.full(steps + 1, 1.0 / steps)
    weights[[0, -1]] *= 0.5
  elif rule == "midpoint":
    alphas = (np.arange(steps) + 0.5) / steps
    weights = np.full(steps, 1.0 / steps)
  else:
    raise ConfigError(f"unknown integration rule {rule!r}; use 'trapezoid' or 'midpoint'")
  return alphas, weights


@METHODS.register("integrated_gradients")
def integrated_gradients(fn: LogitFn, inputs: jax.Array, targets: jax.Array | None = None, *,
                         baseline: str | jax.Array = "zeros", steps: int = 50,
                         rule: str = "trapezoid", chunk_size: int = 32) -> jax.Array:
  """Integrated gradients (Sundararajan et al., 2017): ``(x - b) * mean grad`` on the path b->x.

  Satisfies completeness: the attributions of an example sum to ``f(x) - f(baseline)`` up to the
  quadrature error, which shrinks as ``steps`` grows. ``baseline`` is 'zeros', 'mean' (the
  batch's per-feature mean) or an array broadcastable to ``inputs``. ``rule`` is 'trapezoid'
  (``steps + 1`` gradient evaluations, includes both ends) or 'midpoint' (``steps``).
  ``chunk_size`` path points are evaluated at once (vmapped); lower it to save memory.
  """
  steps = _check_positive_int("steps", steps)
  chunk_size = _check_positive_int("chunk_size", chunk_size)
  x = _as_float(inputs)
  t = _targets(fn, x, targets)
  b = _baseline(baseline, x)
  delta = x - b
  grad = _input_gradient(fn, t)
  alphas, weights = _quadrature(steps, rule)
  mean_grad = _weighted_sum(lambda a: grad(b + a * delta), jnp.asarray(alphas, x.dtype),
                            jnp.asarray(weights, x.dtype), jnp.zeros_like(x), chunk_size)
  return delta * mean_grad


@METHODS.register("smoothgrad")
def smoothgrad(fn: LogitFn, inputs: jax.Array, targets: jax.Array | None = None, *,
               noise: float = 0.15, samples: int = 50, rng: jax.Array | None = None,
               chunk_size: int = 16) -> jax.Array:
  """SmoothGrad (Smilkov et al., 2017): the saliency averaged over noisy copies of the input.

  The noise is Gaussian with std ``noise * (max(x) - min(x))``, the range taken per example, so
  one ``noise`` level suits any input scale. ``rng`` defaults to ``jax.random.key(0)`` so repeated
  calls agree; ``noise=0`` gives exactly the saliency.
  """
  samples = _check_positive_int("samples", samples)
  chunk_size = _check_positive_int("chunk_size", chunk_size)
  if not noise >= 0:
    raise ConfigError(f"noise must be >= 0 (a fraction of the input range); got {noise!r}")
  x = _as_float(inputs)
  grad = _input_gradient(fn, _targets(fn, x, targets))
  feature_axes = tuple(range(1, x.ndim))
  span = jnp.max(x, axis=feature_axes, keepdims=True) - jnp.min(x, axis=feature_axes,
                                                                 keepdims=True)
  sigma = noise * span
  rng = jax.random.key(0) if rng is None else rng

  def noisy_grad(key):
    return grad(x + sigma * jax.random.normal(key, x.shape, x.dtype))

  keys = jax.random.split(rng, samples)
  weights = jnp.full((samples,), 1.0 / samples, x.dtype)
  return _weighted_sum(noisy_grad, keys, weights, jnp.zeros_like(x), chunk_size)


# ----------------------------------------------------------------------------------------------
# Perturbation
# ----------------------------------------------------------------------------------------------

def _per_dim(name: str, value: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
  values = (value,) * ndim if isinstance(value, (int, np.integer)) else tuple(value)
  if len(values) != ndim:
    raise ConfigError(f"{name} needs {ndim} value(s) (one per spatial axis); got {value!r}")
  for v in values:
    _check_positive_int(name, v)
  return tuple(int(v) for v in values)


def _window_starts(length: int, patch: int, stride: int) -> list[int]:
  """Window starts along one axis; a last window flush with the end so every feature is hit."""
  starts = list(range(0, length - patch + 1, stride))
  if starts[-1] + patch < length:
    starts.append(length - patch)
  return starts


@METHODS.register("occlusion")
def occlusion(fn: LogitFn, inputs: jax.Array, targets: jax.Array | None = None, *,
              patch: int | tuple[int, ...] = 1, stride: int | tuple[int, ...] | None = None,
              fill: float | jax.Array = 0.0, chunk_size: int = 64) -> jax.Array:
  """Occlusion (Zeiler & Fergus, 2014): the drop in the target logit when a patch is replaced.

  Inputs (B, D) are flat feature vectors: windows of ``patch`` consecutive features. Inputs
  (B, *spatial, C), e.g. NHWC images, slide ``patch`` over the spatial axes and occlude every
  channel together, so all channels of a position get the same attribution. Each feature gets
  ``f(x) - f(x occluded)`` averaged over the windows that cover it. ``stride`` defaults to
  ``patch``; ``fill`` is the replacement value (a scalar or an array broadcastable to inputs).
  ``chunk_size`` occluded copies of the batch are evaluated at once.
  """
  chunk_size = _check_positive_int("chunk_size", chunk_size)
  x = _as_float(inputs)
  if x.ndim < 2:
    raise ConfigError(f"occlusion needs batched inputs (B, D) or (B, *spatial, C); "
                      f"got shape {tuple(x.shape)}")
  t = _targets(fn, x, targets)
  spatial = x.shape[1:] if x.ndim == 2 else x.shape[1:-1]
  patch = _per_dim("patch", patch, len(spatial))
  stride = patch if stride is None else _per_dim("stride", stride, len(spatial))
  for length, p in zip(spatial, patch):
    if p > length:
      raise ConfigError(f"patch {patch} is larger than the input's spatial shape {spatial}")
  starts = np.array(list(itertools.product(
      *(_window_starts(n, p, s) for n, p, s in zip(spatial, patch, stride)))), np.int32)
  counts = np.zeros(spatial, np.float32)
  for start in starts:  # static: how many windows cover each position, to average over them
    counts[tuple(slice(s, s + p) for s, p in zip(start, patch))] += 1
  fill = jnp.asarray(fill, x.dtype)
  base = _target_logits(fn, x, t)

  def window(start):
    mask = jnp.ones(spatial, bool)
    for axis, (n, p) in enumerate(zip(spatial, patch)):
      idx = jnp.arange(n).reshape([-1 if a == axis else 1 for a in range(len(spatial))])
      mask &= (idx >= start[axis]) & (idx < start[axis] + p)
    return mask

  def drop_times_mask(start):
    mask = window(start)
    full = mask if x.ndim == 2 else mask[..., None]  # broadcast over channels
    occluded = jnp.where(full, fill, x)
    drop = base - _target_logits(fn, occluded, t)  # (B,)
    return drop.reshape((-1,) + (1,) * len(spatial)) * mask.astype(x.dtype)

  weights = jnp.ones((starts.shape[0],), x.dtype)
  total = _weighted_sum(drop_times_mask, jnp.asarray(starts), weights,
                        jnp.zeros((x.shape[0],) + spatial, x.dtype), chunk_size)
  attribution = total / jnp.asarray(counts, x.dtype)
  if x.ndim > 2:
    attribution = jnp.broadcast_to(attribution[..., None], x.shape)
  return attribution


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------

def method_options(name: str) -> list[str]:
  """The keyword options that attribution method ``name`` accepts."""
  params = inspect.signature(METHODS.get(name)).parameters.values()
  return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def attribute(name: str, fn: LogitFn, inputs: jax.Array, targets: jax.Array | None = None,
              **options) -> jax.Array:
  """Runs attribution method ``name``; unknown names or options are a one-line ConfigError."""
  known = method_options(name)
  unknown = sorted(set(options) - set(known))
  if unknown:
    raise ConfigError(f"unknown option(s) {', '.join(map(repr, unknown))} for attribution method "
                      f"{name!r}; known: {', '.join(known) or '(none)'}")
  return METHODS.get(name)(fn, inputs, targets, **options)
