"""The training state: everything a step needs, as one pytree (so it can be jitted, sharded,
donated and checkpointed as a whole)."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import struct

from deepflow.pytree import path_name


class TrainState(struct.PyTreeNode):
  """step: updates taken so far; params and opt_state; model_state: the model's non-trained
  collections (e.g. batch_stats); rng: the run's base key (step keys are ``fold_in(rng, step)``,
  so a resumed run draws the same randomness); nonfinite: consecutive skipped updates."""
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any
  rng: jax.Array
  nonfinite: jax.Array


def create_state(update, tx, seed: int, loaded: Mapping[str, jax.Array] | None = None
                 ) -> TrainState:
  """A fresh state: parameters from ``update.init`` (a ``train.update.Update``: the task's
  model with any LoRA adapters) with a key derived from the seed. ``loaded``
  (flat variable names such as 'params/Dense_0/kernel' or 'batch_stats/...' -> arrays) replaces
  those variables before the optimizer state is built from the parameters; under jit, XLA drops
  the initialisation of every replaced variable as dead code."""
  rng = jax.random.PRNGKey(seed)
  init_rng, run_rng = jax.random.split(rng)
  params, model_state = update.init(init_rng)
  if loaded:
    params = _replaced(params, loaded, "params/")
    model_state = _replaced(model_state, loaded, "")
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    model_state=model_state, rng=run_rng, nonfinite=jnp.zeros((), jnp.int32))


def _replaced(tree: Any, loaded: Mapping[str, jax.Array], prefix: str) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: loaded.get(prefix + path_name(path), leaf), tree)
