"""Optimizers from config, as optax chains.

Every optimizer is built the same way, so its options compose:
``clip_by_global_norm -> direction (scale_by_adam, trace, ...) -> masked decoupled weight decay ->
scale by -learning_rate(step)``. A registered factory supplies only the direction (and where a
method needs it, the placement of the decay, as LAMB's trust ratio does).
"""
from __future__ import annotations

from typing import Any, Callable

import optax

from deepflow.optim.schedules import build_schedule
from deepflow.pytree import Selector
from deepflow.registry import OPTIMIZERS

Direction = Callable[[Any, optax.GradientTransformation], optax.GradientTransformation]


def _register(name: str) -> Callable[[Direction], Direction]:
  return OPTIMIZERS.register(name)


@_register("sgd")
def sgd(c, decay):
  """Plain SGD (momentum=0), heavy-ball momentum, or Nesterov momentum (nesterov=True)."""
  direction = optax.trace(decay=c.momentum, nesterov=c.nesterov) if c.momentum else optax.identity()
  return optax.chain(direction, decay)


@_register("adam")
def adam(c, decay):
  return optax.chain(optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps), decay)


@_register("adamw")
def adamw(c, decay):
  """Adam with decoupled weight decay (Loshchilov & Hutter): set optimizer.weight_decay."""
  return adam(c, decay)


@_register("nadam")
def nadam(c, decay):
  return optax.chain(optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps, nesterov=True), decay)


@_register("rmsprop")
def rmsprop(c, decay):
  """RMSProp (decay rate b2), with heavy-ball momentum when momentum > 0."""
  parts = [optax.scale_by_rms(decay=c.b2, eps=c.eps)]
  if c.momentum:
    parts.append(optax.trace(decay=c.momentum, nesterov=c.nesterov))
  return optax.chain(*parts, decay)


@_register("adagrad")
def adagrad(c, decay):
  return optax.chain(optax.scale_by_rss(initial_accumulator_value=0.1, eps=c.eps), decay)


@_register("lion")
def lion(c, decay):
  """Lion (Chen et al., 2023): sign of an interpolated momentum; use a ~3-10x smaller rate."""
  return optax.chain(optax.scale_by_lion(b1=c.b1, b2=c.b2), decay)


@_register("lamb")
def lamb(c, decay):
  """LAMB: Adam direction plus decay, rescaled per layer by the trust ratio."""
  return optax.chain(optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps), decay,
                     optax.scale_by_trust_ratio())


@_register("adafactor")
def adafactor(c, decay):
  """Adafactor's factored second moments (memory-light for large matrices)."""
  return optax.chain(optax.scale_by_factored_rms(), decay)


def decay_mask(pattern: str) -> Callable[[Any], Any]:
  """A mask function: True for parameters whose '/'-joined path matches ``pattern``."""
  return Selector(pattern, "optimizer.weight_decay_mask").mask


def selectors(c: Any) -> list[Selector]:
  """The parameter selections the ``optimizer`` section makes (``Selector.check`` them against
  the model): the weight-decay mask, where weight decay is on."""
  return [Selector(c.weight_decay_mask, "optimizer.weight_decay_mask")] if _set(
      c.weight_decay) else []


def build_optimizer(c: Any, total_steps: int, *,
                    gradient: optax.GradientTransformation | None = None,
                    projection: optax.GradientTransformation | None = None
                    ) -> optax.GradientTransformation:
  """The optax chain that ``optimizer`` (a config section) describes. Regularizers add
  ``gradient`` (after clipping, e.g. gradient noise) and ``projection`` (last, e.g. max-norm)."""
  decay = (optax.add_decayed_weights(c.weight_decay, mask=decay_mask(c.weight_decay_mask))
           if _set(c.weight_decay) else optax.identity())
  parts = []
  if _set(c.clip_norm):
    parts.append(optax.clip_by_global_norm(c.clip_norm))
  if gradient is not None:
    parts.append(gradient)
  parts.append(OPTIMIZERS.get(c.name)(c, decay))
  parts.append(optax.scale_by_learning_rate(build_schedule(c, total_steps)))
  if projection is not None:
    parts.append(projection)
  return optax.chain(*parts)


def _set(value: Any) -> bool:
  """An option is on unless it is a Python zero; a traced value (a vectorized sweep's
  hyperparameter, which may differ per trial) keeps its transformation in the chain."""
  return not isinstance(value, (int, float)) or value != 0
