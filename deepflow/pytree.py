"""Pytree helpers shared across rooms (optimizer masks, regularizers, shardings, tasks' mixed
precision): names of leaves and dtype casts, with no dependency beyond JAX."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def path_name(path) -> str:
  """'layer/sub/kernel' for a pytree key path."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def cast_floats(tree: PyTree, dtype) -> PyTree:
  """Casts the floating-point leaves of ``tree`` to ``dtype`` (integers, e.g. tokens, stay)."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)
