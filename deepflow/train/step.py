"""The pure train and eval steps, and their jit-compiled, sharded forms.

``train_step(state, batch) -> (state, metrics)`` is the whole update of one batch, in this file:
the gradient (``gradient_fn``: the task's objective differentiated w.r.t. the trained parameters
only, with the run's transforms around it: batch regularizers, penalties, DP-SGD, micro-batches,
freezing), one optimizer update, and a guard: if the loss or any gradient is not finite, the
update is not applied (the state stays the last good one), ``metrics['nonfinite']`` says so and
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
from deepflow.train import gradients
from deepflow.train.state import TrainState
from deepflow.train.update import Update

Batch = Mapping[str, jax.Array]


def gradient_fn(u: Update) -> gradients.FullGradFn:
  """The gradient of one batch, from the task's objective out (``deepflow.train.gradients``):
  differentiated (DP-SGD's clipped and noised per-example sum, the task's own, or plain), the
  batch regularizers before it, the parameter penalties after it, averaged over micro-batches,
  and the frozen parameters split off around all of it."""
  task, reg = u.task, u.regularizer
  if u.privacy is not None:
    grad_fn = gradients.private(task.loss, u.privacy, u.model_params)
  elif task.differentiates_itself:
    grad_fn = gradients.own(task, u.model_params)
  else:
    grad_fn = gradients.value_and_grad(task.loss, u.model_params)
  grad_fn = gradients.add_penalty(grad_fn, reg.penalty)
  grad_fn = gradients.transform_batch(grad_fn, reg.batch, task.spec.num_classes)
  grad_fn = gradients.accumulate(grad_fn, u.microbatches)
  return gradients.freeze(grad_fn, u.partition)


def all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(u: Update) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  grad_fn = gradient_fn(u)

  def train_step(state: TrainState, batch: Batch):
    rng = jax.random.fold_in(state.rng, state.step)
    grads, model_state, metrics = grad_fn(state.params, state.model_state, batch, rng)
    if u.freeze_batch_stats:  # running statistics stay as loaded
      model_state = state.model_state
    updates, opt_state = u.tx.update(grads, state.opt_state, state.params)
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
    if u.regularizer.metrics is not None:  # e.g. pruning's sparsity per layer
      metrics = {**metrics, **u.regularizer.metrics(new_state.params)}
    metrics = {**metrics, "grad_norm": optax.global_norm(grads),
               "nonfinite": 1.0 - finite.astype(jnp.float32),
               "nonfinite_streak": new_state.nonfinite.astype(jnp.float32)}
    return new_state, metrics
  return train_step


def make_eval_step(u: Update) -> Callable[[TrainState, Batch], dict]:
  """Per-example outputs of the task, plus the batch's mask so padding rows can be dropped."""
  def eval_step(state: TrainState, batch: Batch):
    outputs = u.task.eval_outputs(u.model_params(state.params), state.model_state, batch)
    return {**outputs, MASK: batch[MASK]}
  return eval_step


def compile_steps(u: Update, mesh, state_sharding, *, compiler_options: dict | None = None):
  """The jitted train step (state donated) and eval step, with explicit shardings and XLA's
  ``compiler_options`` (``deepflow.train.tuning``). Under ``jax.disable_jit`` (``--debug``) they
  run as plain Python, to step through them eagerly."""
  train_step, eval_step = make_train_step(u), make_eval_step(u)
  batch = parallel.batch_sharding(mesh)
  options = dict(compiler_options or {}) or None
  return (jax.jit(train_step, in_shardings=(state_sharding, batch),
                  out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=0,
                  compiler_options=options),
          jax.jit(eval_step, in_shardings=(state_sharding, batch), out_shardings=batch,
                  compiler_options=options))
