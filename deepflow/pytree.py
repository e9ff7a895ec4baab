"""Pytree helpers shared across rooms (optimizer masks, regularizers, shardings, LoRA, weight
files, tasks' mixed precision): the one name of a leaf, the one way to select leaves by a regex
on that name, and dtype casts."""
from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
from flax import traverse_util

from deepflow.registry import ConfigError, compile_regex, some_names

PyTree = Any


def path_name(path) -> str:
  """'layer/sub/kernel' for a pytree key path (or a ``flatten_dict`` tuple key)."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def flatten(tree: PyTree) -> dict[str, Any]:
  """{'layer/sub/kernel': leaf, ...}: every leaf under its ``path_name``."""
  return {path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  """Nested dicts again from ``flatten``'s names."""
  return traverse_util.unflatten_dict(flat, sep="/")


class Selector:
  """The leaves of a parameter tree whose ``path_name`` matches the regex ``pattern`` (re.search),
  given by the config option ``key``.

  One rule for every selection by regex (weight decay, freezing, learning-rate groups, penalties,
  max-norm, LoRA targets, sharding rules, weights left fresh): the pattern must be a regex, and
  one that selects no parameter of the model is a one-line ConfigError from ``check``, run once
  on the whole model's names when the experiment is built, since a typo would otherwise select
  nothing in silence. ``mask`` and ``leaves`` themselves never raise: optax applies them to parts
  of the tree (the trained parameters only), where selecting nothing is legitimate."""

  def __init__(self, pattern: str, key: str):
    self.pattern, self.key = pattern, key
    self.regex = compile_regex(pattern, key)

  def __call__(self, name: str) -> bool:
    return bool(self.regex.search(name))

  def mask(self, tree: PyTree) -> PyTree:
    """``tree`` with True on the selected leaves and False elsewhere (an optax mask)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: self(path_name(p)), tree)

  def leaves(self, tree: PyTree) -> list[Any]:
    return [x for p, x in jax.tree_util.tree_leaves_with_path(tree) if self(path_name(p))]

  def check(self, names: Iterable[str], what: str = "parameter") -> None:
    """A ConfigError naming the pattern if it selects none of ``names``."""
    names = list(names)
    if not any(self(n) for n in names):
      raise ConfigError(f"{self.key} {self.pattern!r} matches no {what}; the model's are: "
                        f"{some_names(names)}")


def cast_floats(tree: PyTree, dtype) -> PyTree:
  """Casts the floating-point leaves of ``tree`` to ``dtype`` (integers, e.g. tokens, stay)."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)
