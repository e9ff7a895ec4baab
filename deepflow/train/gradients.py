"""Gradient functions and the transforms that wrap them, optax-style.

A gradient function takes the trained parameters and the frozen ones apart (``Partition.split``;
the frozen part is ``{}`` when nothing is frozen) and differentiates only the first:

  grad_fn(trained, frozen, model_state, batch, rng) -> (grads of trained, model_state, metrics)

``value_and_grad`` (the loss of the batch), ``private`` (DP-SGD: each example's gradient clipped,
their sum noised) and ``own`` (a task that differentiates itself, e.g. the GAN's two players)
make one from an objective; ``transform_batch`` (label smoothing, mixup, device crops),
``add_penalty`` (l1, l2) and ``accumulate`` (micro-batches) each wrap one and return another, so
any of them compose in any order; ``freeze`` is last: it takes the whole parameter tree, as the
optimizer does, and puts zeros where parameters are frozen. ``train.step.gradient_fn`` composes
them for one run.

An objective is ``loss(params, model_state, batch, rng) -> (loss, (metrics, model_state))`` on
the parameters the model takes; ``to_model`` maps the stored parameters to those (LoRA's adapters
merged into their kernels; the identity otherwise), so no task knows about reparameterizations.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from deepflow.data.pipeline import MASK
from deepflow.optim.partition import Partition
from deepflow.tasks.base import Task

PyTree = Any
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
Loss = Callable[[PyTree, PyTree, Batch, jax.Array], tuple[jax.Array, tuple[Metrics, PyTree]]]
GradFn = Callable[[PyTree, PyTree, PyTree, Batch, jax.Array], tuple[PyTree, PyTree, Metrics]]
FullGradFn = Callable[[PyTree, PyTree, Batch, jax.Array], tuple[PyTree, PyTree, Metrics]]


def identity(params: PyTree) -> PyTree:
  return params


def value_and_grad(loss: Loss, to_model: Callable[[PyTree], PyTree] = identity) -> GradFn:
  """The gradient of the batch's ``loss``, reported as metric ``loss`` beside the loss's own."""
  def grad_fn(trained, frozen, model_state, batch, rng):
    def of_trained(t):
      return loss(to_model(Partition.merge(t, frozen)), model_state, batch, rng)
    (value, (metrics, model_state)), grads = jax.value_and_grad(of_trained, has_aux=True)(
        trained)
    return grads, model_state, {"loss": value, **metrics}
  return grad_fn


def private(loss: Loss, privacy: Any, to_model: Callable[[PyTree], PyTree] = identity) -> GradFn:
  """DP-SGD (``privacy``: a ``deepflow.privacy.DpSgd``): ``loss`` of each example on its own, a
  batch of one, each gradient w.r.t. the trained parameters clipped, their sum noised (frozen
  parameters enter neither the clipping norm nor the noise). A Poisson batch's padding rows
  (``mask`` 0) get zero loss, so zero gradient. The model state is left as it came: DP-SGD runs
  only models without batch statistics (``train.update.build_update``)."""
  def grad_fn(trained, frozen, model_state, batch, rng):
    def example_loss(t, example, key):
      example = dict(example)
      real = example.pop(MASK, 1.0)
      one = jax.tree.map(lambda x: x[None], example)
      value, (metrics, _) = loss(to_model(Partition.merge(t, frozen)), model_state, one, key)
      return real * value, metrics
    grads, metrics = privacy.gradients(example_loss, trained, batch, rng)
    return grads, model_state, metrics
  return grad_fn


def own(task: Task, to_model: Callable[[PyTree], PyTree] = identity) -> GradFn:
  """The gradients a task computes itself (``Task.trained_grads``, e.g. one per GAN player),
  given how its trained parameters become the model's: ``params_of(trained)``."""
  def grad_fn(trained, frozen, model_state, batch, rng):
    return task.trained_grads(trained, lambda t: to_model(Partition.merge(t, frozen)),
                              model_state, batch, rng)
  return grad_fn


def add_penalty(grad_fn: GradFn, penalty: Callable[[PyTree], jax.Array] | None) -> GradFn:
  """Adds a parameter penalty (l1, l2 on the stored parameters) to the loss: its gradient to the
  gradients, its value to metric ``loss`` and as ``penalty``. It depends on no example, so under
  DP-SGD it is added after the noise, unclipped and at no privacy cost."""
  if penalty is None:
    return grad_fn

  def wrapped(trained, frozen, model_state, batch, rng):
    grads, model_state, metrics = grad_fn(trained, frozen, model_state, batch, rng)
    value, penalty_grads = jax.value_and_grad(
        lambda t: penalty(Partition.merge(t, frozen)))(trained)
    return (jax.tree.map(jnp.add, grads, penalty_grads), model_state,
            {**metrics, "loss": metrics["loss"] + value, "penalty": value})
  return wrapped


def transform_batch(grad_fn: GradFn, batch_fn: Callable | None,
                    num_classes: int | None) -> GradFn:
  """Changes each training batch before the gradient (label smoothing, mixup, cutmix, device
  crops and flips) with its own key, ``fold_in(rng, 1)``."""
  if batch_fn is None:
    return grad_fn

  def wrapped(trained, frozen, model_state, batch, rng):
    batch = batch_fn(batch, jax.random.fold_in(rng, 1), num_classes)
    return grad_fn(trained, frozen, model_state, batch, rng)
  return wrapped


def split_microbatches(batch: Batch, n: int) -> Batch:
  """(B, ...) -> (n, B/n, ...) with micro-batch i = rows i, i+n, i+2n, ...: every device keeps
  its own rows (a contiguous reshape would move data between devices)."""
  def split(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def accumulate(grad_fn: GradFn, microbatches: int) -> GradFn:
  """The mean gradient and metrics over ``microbatches`` equal parts of the batch (``lax.scan``;
  part i gets the key ``fold_in(rng, i)``), the model state carried from part to part."""
  if microbatches == 1:
    return grad_fn

  def wrapped(trained, frozen, model_state, batch, rng):
    def body(carry, xs):
      grad_sum, model_state = carry
      index, micro = xs
      grads, model_state, metrics = grad_fn(trained, frozen, model_state, micro,
                                            jax.random.fold_in(rng, index))
      return (jax.tree.map(jnp.add, grad_sum, grads), model_state), metrics

    zeros = jax.tree.map(jnp.zeros_like, trained)
    (grad_sum, model_state), metrics = jax.lax.scan(
        body, (zeros, model_state),
        (jnp.arange(microbatches), split_microbatches(batch, microbatches)))
    return (jax.tree.map(lambda x: x / microbatches, grad_sum), model_state,
            jax.tree.map(lambda m: m.mean(0), metrics))
  return wrapped


def freeze(grad_fn: GradFn, partition: Partition) -> FullGradFn:
  """``grad_fn`` on the whole parameter tree: split into trained and frozen parts, only the
  trained differentiated (the frozen ones are constants, so their weight gradients are never
  computed), zeros put in the frozen places afterwards for the optimizer's whole-tree layout."""
  def wrapped(params, model_state, batch, rng):
    trained, frozen = partition.split(params)
    grads, model_state, metrics = grad_fn(trained, frozen, model_state, batch, rng)
    return partition.fill(grads, frozen), model_state, metrics
  return wrapped
