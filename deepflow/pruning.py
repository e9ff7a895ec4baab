"""Magnitude pruning with a gradual sparsity schedule (Zhu & Gupta, 2017, "To prune, or not to
prune"), as an optax transformation last in the optimizer chain (the ``pruning`` regularizer).

Every ``frequency`` steps from ``start_step`` to ``end_step``, each selected weight array's
smallest-magnitude values are masked so that its sparsity is the schedule's

    s(t) = s_f + (s_i - s_f) * (1 - (t - start) / (end - start)) ** power

(``power=3`` in the paper), and after every update the weights are multiplied by their masks, so
a pruned weight stays exactly zero. The masks and the step count are the transformation's state,
i.e. part of the optimizer state in the train state: they are checkpointed, restored on resume
and sharded like the parameters they mask. Steps are counted as updates applied (a skipped
non-finite step leaves the optimizer state, this count included, unchanged).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from deepflow.pytree import Selector, flatten, path_name
from deepflow.registry import ConfigError, is_number

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The sparsity schedule: ``sparsity`` (s_f) reached at ``end_step`` from ``initial`` (s_i)
  at ``start_step``, masks recomputed every ``frequency`` steps in between."""
  sparsity: float
  start_step: int
  end_step: int
  frequency: int = 100
  initial: float = 0.0
  power: float = 3.0

  def __post_init__(self):
    for key in ("sparsity", "initial"):
      value = getattr(self, key)
      if not is_number(value) or not 0 <= value < 1:
        raise ConfigError(f"regularizer 'pruning': {key} must be in [0, 1), got {value!r}")
    for key in ("start_step", "end_step", "frequency"):
      value = getattr(self, key)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"regularizer 'pruning': {key} must be an integer >= 0, got {value!r}")
    if self.end_step <= self.start_step:
      raise ConfigError(f"regularizer 'pruning': the schedule ends (end_step={self.end_step}) "
                        f"before it starts (start_step={self.start_step})")
    if self.frequency < 1 or not is_number(self.power) or self.power <= 0:
      raise ConfigError(f"regularizer 'pruning': frequency must be >= 1 and power > 0, got "
                        f"{self.frequency!r} and {self.power!r}")

  def target(self, step: jax.Array) -> jax.Array:
    """s(t) of the formula at ``step`` (clipped to [start, end]; 0 before the start)."""
    progress = jnp.clip((step - self.start_step) / (self.end_step - self.start_step), 0.0, 1.0)
    s = self.sparsity + (self.initial - self.sparsity) * (1.0 - progress) ** self.power
    return jnp.where(step < self.start_step, 0.0, s)

  def prunes_at(self, step: jax.Array) -> jax.Array:
    """Whether the masks are recomputed after the update that reaches ``step``."""
    inside = (step >= self.start_step) & (step <= self.end_step)
    return inside & (((step - self.start_step) % self.frequency == 0) | (step == self.end_step))


class PruningState(NamedTuple):
  count: jax.Array  # updates applied so far
  masks: PyTree  # per parameter: a bool mask (selected) or a scalar True (not pruned)


def magnitude_mask(weights: jax.Array, sparsity: jax.Array) -> jax.Array:
  """True for all but the ``round(sparsity * size)`` smallest-magnitude values of ``weights``
  (ties broken by position, so the count is exact)."""
  flat = jnp.abs(weights).reshape(-1)
  pruned = jnp.round(sparsity * flat.size).astype(jnp.int32)
  rank = jnp.argsort(jnp.argsort(flat, stable=True), stable=True)
  return (rank >= pruned).reshape(weights.shape)


def pruning(schedule: Schedule, select: Selector) -> optax.GradientTransformation:
  """The transformation (last in the chain): updates ``u`` become ``mask * (p + u) - p``, with
  the masks of the selected parameters recomputed from ``|p + u|`` on the schedule's steps."""
  def init(params):
    masks = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.ones(x.shape if select(path_name(p)) else (), bool), params)
    return PruningState(jnp.zeros((), jnp.int32), masks)

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("pruning needs the parameters in the optimizer update")
    count = state.count + 1
    new = jax.tree.map(lambda p, u: p + u, params, updates)

    def recompute(masks):
      s = schedule.target(count)
      return jax.tree_util.tree_map_with_path(
          lambda p, m, x: magnitude_mask(x, s) if select(path_name(p)) else m, masks, new)
    masks = jax.lax.cond(schedule.prunes_at(count), recompute, lambda m: m, state.masks)
    updates = jax.tree.map(lambda p, x, m: (jnp.where(m, x, 0) - p).astype(p.dtype),
                           params, new, masks)
    return updates, PruningState(count, masks)

  return optax.GradientTransformation(init, update)


def layer_sparsity(params: PyTree, select: Selector) -> dict[str, jax.Array]:
  """``sparsity/NAME``: the fraction of exact zeros in every selected parameter, and
  ``sparsity``: over all of them (the train metrics of a pruned run)."""
  chosen = {name: x for name, x in flatten(params).items() if select(name)}
  zeros = {name: jnp.sum(x == 0) for name, x in chosen.items()}
  metrics = {f"sparsity/{name}": zeros[name] / x.size for name, x in chosen.items()}
  total = sum(x.size for x in chosen.values())
  if total:
    metrics["sparsity"] = sum(zeros.values()) / total
  return metrics


def is_pruned(config: Any) -> bool:
  """Whether ``config`` lists the ``pruning`` regularizer (its export compresses the weights)."""
  return any(dict(entry).get("name") == "pruning" for entry in config.regularizers)
