"""The pure train and eval steps, and their jit-compiled, sharded forms.

``train_step(state, batch) -> (state, metrics)``: gradients from the task, of the trained
parameters only (averaged over micro-batches with ``lax.scan`` when ``train.microbatches > 1``),
one optimizer update, and a guard: if the loss or any gradient is not finite, the update is not
applied (the state stays the last good one), ``metrics['nonfinite']`` says so and
``metrics['nonfinite_streak']`` counts such steps in a row (``TrainState.nonfinite``); the loop
decides whether to stop.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from deepflow import parallel
from deepflow.data.pipeline import MASK
from deepflow.train.state import TrainState

Batch = Mapping[str, jax.Array]


def split_microbatches(batch: Batch, n: int) -> Batch:
  """(B, ...) -> (n, B/n, ...) with micro-batch i = rows i, i+n, i+2n, ...: every device keeps
  its own rows (a contiguous reshape would move data between devices)."""
  def split(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def accumulate_grads(task, params, model_state, batch: Batch, rng, microbatches: int):
  """The mean gradient and metrics over ``microbatches`` equal parts of the batch. Only the
  trained parameters are differentiated and summed (``Task.trained_grads``); the frozen ones'
  zeros are put in once, after the sum."""
  if microbatches == 1:
    return task.grads(params, model_state, batch, rng)
  trained, frozen = task.partition.split(params)

  def body(carry, xs):
    grad_sum, model_state = carry
    index, micro = xs
    grads, model_state, metrics = task.trained_grads(trained, frozen, model_state, micro,
                                                     jax.random.fold_in(rng, index))
    return (jax.tree.map(jnp.add, grad_sum, grads), model_state), metrics

  zeros = jax.tree.map(jnp.zeros_like, trained)
  (grad_sum, model_state), metrics = jax.lax.scan(
      body, (zeros, model_state), (jnp.arange(microbatches), split_microbatches(batch,
                                                                              microbatches)))
  mean = jax.tree.map(lambda x: x / microbatches, grad_sum)
  return (task.partition.fill(mean, frozen), model_state,
          jax.tree.map(lambda m: m.mean(0), metrics))


def all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(task, tx: optax.GradientTransformation, microbatches: int = 1
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  def train_step(state: TrainState, batch: Batch):
    rng = jax.random.fold_in(state.rng, state.step)
    grads, model_state, metrics = accumulate_grads(task, state.params, state.model_state, batch,
                                                   rng, microbatches)
    if task.config.optimizer.freeze_batch_stats:  # running statistics stay as loaded
      model_state = state.model_state
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(metrics["loss"]) & all_finite(grads)
    # Why not optax.apply_if_finite: it guards the optimizer only; batch statistics and the
    # loss itself must be guarded too, so the kept state is wholly the last good one.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        model_state=keep(model_state, state.model_state),
        nonfinite=jnp.where(finite, 0, state.nonfinite + 1))
    # The streak the loop's non-finite policy reads is the state's (it survives a resume).
    metrics = {**metrics, "grad_norm": optax.global_norm(grads),
               "nonfinite": 1.0 - finite.astype(jnp.float32),
               "nonfinite_streak": new_state.nonfinite.astype(jnp.float32)}
    return new_state, metrics
  return train_step


def make_eval_step(task) -> Callable[[TrainState, Batch], dict]:
  """Per-example outputs of the task, plus the batch's mask so padding rows can be dropped."""
  def eval_step(state: TrainState, batch: Batch):
    return {**task.eval_outputs(state.params, state.model_state, batch), MASK: batch[MASK]}
  return eval_step


def compile_steps(task, tx, mesh, state_sharding, microbatches: int = 1, *, debug: bool = False,
                  compiler_options: dict | None = None):
  """The jitted train step (state donated) and eval step, with explicit shardings and XLA's
  ``compiler_options`` (``deepflow.train.tuning``). With ``debug`` the plain Python functions
  are returned, to step through them eagerly."""
  train_step, eval_step = make_train_step(task, tx, microbatches), make_eval_step(task)
  if debug:
    return train_step, eval_step
  batch = parallel.batch_sharding(mesh)
  options = dict(compiler_options or {}) or None
  return (jax.jit(train_step, in_shardings=(state_sharding, batch),
                  out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=0,
                  compiler_options=options),
          jax.jit(eval_step, in_shardings=(state_sharding, batch), out_shardings=batch,
                  compiler_options=options))
