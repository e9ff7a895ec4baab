"""Which parameters train, and how fast: freezing and per-group learning rates by regex.

``optimizer.freeze`` (a regex on '/'-joined parameter paths, e.g. ``^backbone/``) and, with
``model.lora``, every parameter but the adapters are frozen: ``optax.multi_transform`` gives them
``optax.set_to_zero`` and the configured chain sees only the trained ones (so clipping's global
norm, weight decay and the optimizer's moments cover those alone, and frozen parameters hold no
optimizer state). ``optimizer.lr_multipliers`` ``[(regex, factor), ...]`` then scales the
updates of the parameters the first matching rule names, ``optax.masked(optax.scale(factor))``
after the chain: since the chain ends in ``-learning_rate * direction``, that is the learning
rate times the factor (exactly, unless a projection regularizer such as max_norm follows it).

Frozen parameters are not differentiated at all: ``split`` cuts the parameter tree into its
trained and frozen parts, the task takes gradients w.r.t. the trained part with the frozen one
closed over as constants (so JAX never emits their weight gradients, nor input gradients that
no trained parameter needs), and ``fill`` puts zeros in the frozen places afterwards, outside
differentiation, because the optimizer (and so its state in checkpoints) keeps the whole tree's
layout.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from deepflow.models.lora import is_adapter
from deepflow.pytree import Selector, flatten, path_name
from deepflow.registry import ConfigError

FROZEN, TRAINED = "frozen", "trained"


class Partition:
  """The trained/frozen split and the learning-rate groups of one config."""

  def __init__(self, optimizer: Any, lora_on: bool):
    self.freeze = Selector(optimizer.freeze, "optimizer.freeze") if optimizer.freeze else None
    self.lora_on = lora_on
    self.multipliers = []
    for rule in optimizer.lr_multipliers:
      if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)
              and isinstance(rule[1], (int, float)) and not isinstance(rule[1], bool)
              and rule[1] >= 0):
        raise ConfigError(f"each optimizer.lr_multipliers entry must be (regex, factor >= 0), "
                          f"got {rule!r}")
      self.multipliers.append((Selector(rule[0], "optimizer.lr_multipliers"), float(rule[1])))

  @property
  def active(self) -> bool:
    return bool(self.freeze or self.lora_on or self.multipliers)

  @property
  def freezes(self) -> bool:
    return bool(self.freeze or self.lora_on)

  @property
  def selectors(self) -> list[Selector]:
    """The regexes this partition selects parameters by (``Selector.check`` them)."""
    return [*([self.freeze] if self.freeze else []), *(s for s, _ in self.multipliers)]

  def frozen(self, path: str) -> bool:
    return bool((self.freeze and self.freeze(path))
                or (self.lora_on and not is_adapter(path)))

  def labels(self, params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda p, _: FROZEN if self.frozen(path_name(p)) else TRAINED, params)

  def split(self, params: Any) -> tuple[Any, Any]:
    """(trained, frozen): the parameter tree (nested dicts) cut into two trees of the same
    paths, each holding only its own leaves; ``(params, {})`` when nothing is frozen."""
    if not self.freezes:
      return params, {}
    flat = traverse_util.flatten_dict(params)
    frozen = {k: v for k, v in flat.items() if self.frozen(path_name(k))}
    trained = {k: v for k, v in flat.items() if k not in frozen}
    return traverse_util.unflatten_dict(trained), traverse_util.unflatten_dict(frozen)

  @staticmethod
  def merge(trained: Any, frozen: Any) -> Any:
    """The whole tree again from ``split``'s two parts."""
    if not frozen:
      return trained
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(trained),
                                         **traverse_util.flatten_dict(frozen)})

  @classmethod
  def fill(cls, trained_grads: Any, frozen: Any) -> Any:
    """A gradient of the whole tree from one of the trained part: zeros where parameters are
    frozen (the optimizer's ``set_to_zero`` ignores them)."""
    return cls.merge(trained_grads, jax.tree.map(jnp.zeros_like, frozen))

  def factor_mask(self, index: int) -> Callable[[Any], Any]:
    """True where rule ``index`` is the first rule matching the parameter."""
    def first(path: str) -> bool:
      hits = [i for i, (selector, _) in enumerate(self.multipliers) if selector(path)]
      return bool(hits) and hits[0] == index
    return lambda params: jax.tree_util.tree_map_with_path(lambda p, _: first(path_name(p)),
                                                           params)

  def wrap(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` restricted to the trained parameters, with the learning-rate factors."""
    if not self.active:
      return tx
    scaled = optax.chain(tx, *(optax.masked(optax.scale(factor), self.factor_mask(i))
                               for i, (_, factor) in enumerate(self.multipliers)))
    return optax.multi_transform({TRAINED: scaled, FROZEN: optax.set_to_zero()}, self.labels)

  def check(self, params: Any) -> None:
    """A regex that names no parameter, or a freeze that leaves none to train, is a
    ConfigError (a typo would otherwise train everything, or nothing)."""
    paths = list(flatten(params))
    for selector in self.selectors:
      selector.check(paths)
    if self.active and all(self.frozen(p) for p in paths):
      raise ConfigError("every parameter is frozen (optimizer.freeze, model.lora): nothing "
                        "would train")

  def count(self, params: Any) -> tuple[int, int]:
    """(trained, total) numbers of parameter values."""
    trained = total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
      size = int(np.prod(leaf.shape))
      total += size
      trained += 0 if self.frozen(path_name(path)) else size
    return trained, total

