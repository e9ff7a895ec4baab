"""The training state: everything a step needs, as one pytree (so it can be jitted, sharded,
donated and checkpointed as a whole)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


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


def create_state(task, tx, seed: int) -> TrainState:
  """A fresh state: parameters from ``task.init`` with a key derived from the seed."""
  rng = jax.random.PRNGKey(seed)
  init_rng, run_rng = jax.random.split(rng)
  params, model_state = task.init(init_rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    model_state=model_state, rng=run_rng, nonfinite=jnp.zeros((), jnp.int32))
