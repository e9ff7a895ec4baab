"""DP-SGD's mechanism (Abadi et al., 2016), pure JAX for the train step: per-example gradients
clipped to global L2 norm ``clip_norm`` and summed (``clipped_gradient_sum``), then Gaussian
noise of std ``noise_multiplier * clip_norm`` on the sum, divided by the batch size
(``add_noise``); ``private_gradients`` composes them for one batch.

The step computes the clipped sum itself (rather than handing per-example gradients to
``optax.contrib.differentially_private_aggregate`` or ``optax.per_example_global_norm_clip``)
for three reasons: it needs the per-example norms for metrics, a split between summing and
noising for gradient accumulation, and speed. Those optax pieces take the per-example gradients
materialized, a (batch x parameters) array that dominates the step on CPU (allocating and
reading it costs far more than the arithmetic); here the norms come from a vmapped gradient that
XLA reduces as it goes, and the clipped sum from one ordinary backward pass of the loss weighted
per example by its clip factor (a factor held constant, so the sum of weighted gradients is
exactly the sum of clipped ones).

``clipping`` chooses how the norms and the clipped sum are computed: ``'vmap'`` as above;
``'ghost'`` from each covered layer's inputs and output gradients in one backward pass
(``deepflow.privacy.ghost``, for the layers ``ghost_layers`` covers), with per-example gradients
materialized only for parameters outside such layers; ``'auto'`` (the default) is ``'ghost'``
when every parameter is in a covered layer and ``'vmap'`` otherwise. All three give the same
result up to float rounding.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from deepflow.privacy import ghost
from deepflow.registry import ConfigError

PyTree = Any
PerExampleLoss = Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, Any]]
CLIPPINGS = ("auto", "ghost", "vmap")
log = logging.getLogger("deepflow")


def _batch_size(batch: PyTree) -> int:
  sizes = {leaf.shape[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(batch)}
  if len(sizes) != 1 or None in sizes:
    raise ConfigError(f"every leaf of the batch needs the same leading (batch) axis; got sizes "
                      f"{sorted(map(str, sizes))}")
  return sizes.pop()


def clipped_gradient_sum(per_example_loss: PerExampleLoss, params: PyTree, batch: PyTree,
                         rng: jax.Array, *, clip_norm: float, clipping: str = "auto",
                         mask: jax.Array | None = None, head: int = 0
                         ) -> tuple[PyTree, dict[str, Any]]:
  """Sum over the batch of per-example gradients, each clipped to global L2 norm ``clip_norm``.

  ``per_example_loss(params, example, rng) -> (loss, aux)`` sees one example (every leaf of
  ``batch`` without its leading axis) and its own key, split from ``rng``. Returns
  ``(clipped_sum, aux)`` with ``aux = {'loss': (B,), 'aux': per-example aux, 'grad_norms': (B,)
  norms before clipping, 'num_clipped': scalar}``. Padding examples should have zero loss so
  that they contribute zero gradient.

  A Poisson batch's real rows come first (``mask`` is 1 on a prefix): with ``0 < head < B``,
  the rows from ``head`` on are computed only when ``mask[head]`` is set (a ``lax.cond``), and
  otherwise stand as padding rows would, with zero loss, aux, norm and gradient. The result is
  the whole batch's either way; most steps skip rows that are almost always padding.

  ``clipping='vmap'`` takes two passes (see the module docstring): the per-example gradient norms
  ``n_i``, then the gradient of ``sum_i c_i loss_i`` with ``c_i = min(1, clip_norm / n_i)`` held
  constant, which is ``sum_i c_i grad_i``; each example sees the same key in both passes (same
  dropout mask). ``'ghost'`` and ``'auto'`` are described in the module docstring.
  """
  if clipping not in CLIPPINGS:
    raise ConfigError(f"unknown clipping {clipping!r}; known: {', '.join(CLIPPINGS)}")
  size = _batch_size(batch)
  keys = jax.random.split(rng, size)
  clipped = functools.partial(_clipped_sum, per_example_loss, params, clip_norm=clip_norm,
                              clipping=clipping)
  if mask is None or not 0 < head < size:
    return clipped(batch, keys)
  rows = lambda lo, hi: jax.tree.map(lambda x: x[lo:hi], (batch, keys))  # noqa: E731
  first, first_aux = clipped(*rows(0, head))
  rest = functools.partial(clipped, *rows(head, size))
  padding = lambda: jax.tree.map(jnp.zeros_like, jax.eval_shape(rest))  # noqa: E731
  last, last_aux = jax.lax.cond(mask[head] > 0, rest, padding)
  both = lambda a, b: jnp.concatenate([a, b]) if jnp.ndim(a) else a + b  # noqa: E731
  return jax.tree.map(jnp.add, first, last), jax.tree.map(both, first_aux, last_aux)


def _clipped_sum(per_example_loss: PerExampleLoss, params: PyTree, batch: PyTree,
                 keys: jax.Array, *, clip_norm: float, clipping: str
                 ) -> tuple[PyTree, dict[str, Any]]:
  """``clipped_gradient_sum`` of a batch whose examples get ``keys``."""
  if clipping != "vmap":
    the_plan = ghost.plan(per_example_loss, params, jax.tree.map(lambda x: x[0], batch), keys[0])
    if clipping == "ghost" or the_plan.complete:
      if the_plan.uncovered:
        log.info("privacy: ghost clipping, per-example gradients materialized for %s",
                 ", ".join("/".join(path) for path in the_plan.uncovered))
      return ghost.clipped_sum(per_example_loss, params, batch, keys, clip_norm=clip_norm,
                               the_plan=the_plan)
  example_grad = jax.grad(lambda p, example, key: per_example_loss(p, example, key)[0])
  norms = jax.vmap(lambda example, key: optax.tree.norm(example_grad(params, example, key)))(
      batch, keys)
  # A zero gradient has norm 0: factor 1 (nothing to clip), not clip_norm / 0.
  factors = jax.lax.stop_gradient(jnp.where(norms > clip_norm, clip_norm / norms, 1.0))

  def weighted_loss(p):
    losses, example_aux = jax.vmap(per_example_loss, in_axes=(None, 0, 0))(p, batch, keys)
    return jnp.sum(factors * losses), (losses, example_aux)

  clipped_sum, (losses, example_aux) = jax.grad(weighted_loss, has_aux=True)(params)
  return clipped_sum, {"loss": losses, "aux": example_aux, "grad_norms": norms,
                       "num_clipped": jnp.sum(norms > clip_norm)}


def add_noise(grad_sum: PyTree, rng: jax.Array, *, clip_norm: float, noise_multiplier: float,
              denominator: float) -> PyTree:
  """``(grad_sum + N(0, (noise_multiplier * clip_norm)^2)) / denominator``, one draw per leaf.

  Call once per optimizer step, on the sum of every micro-batch's clipped gradients, with
  ``denominator`` the (expected, under Poisson sampling) number of examples in the step.
  """
  std = noise_multiplier * clip_norm
  noise = optax.tree.random_like(rng, grad_sum)
  return jax.tree.map(lambda g, z: (g + std * z) / denominator, grad_sum, noise)


def private_gradients(per_example_loss: PerExampleLoss, params: PyTree, batch: PyTree,
                      rng: jax.Array, *, clip_norm: float, noise_multiplier: float,
                      denominator: float | None = None, clipping: str = "auto",
                      mask: jax.Array | None = None, head: int = 0
                      ) -> tuple[PyTree, dict[str, Any]]:
  """DP-SGD gradients of one batch: clip per example, sum, add noise, divide by the batch size.

  ``clipping``, ``mask`` and ``head`` are ``clipped_gradient_sum``'s. ``denominator`` defaults
  to the batch's leading size; with Poisson sampling pass the expected batch size instead.
  Returns ``(grads, aux)`` as ``clipped_gradient_sum`` does. With ``noise_multiplier = 0`` and a
  clip norm above every gradient norm this is ``jax.grad`` of the mean loss.

  Under ``jax.jit`` with the batch sharded over devices the sum is global (XLA inserts the
  all-reduce) and the noise is drawn once from a replicated key, so every device applies the same
  update and the result equals the single-device one. With gradient accumulation over ``m``
  micro-batches, either add up ``clipped_gradient_sum`` over them (distinct keys, e.g.
  ``fold_in(rng, i)``) and call ``add_noise`` once on the total, or noise each micro-batch's sum
  with ``noise_multiplier / sqrt(m)``: the ``m`` independent draws add up to the same
  ``N(0, (noise_multiplier * clip_norm)^2)`` on the total, so both are one mechanism in
  distribution. ``DpSgd`` does the latter (the train step's ``lax.scan`` sees one micro-batch at
  a time).
  """
  loss_rng, noise_rng = jax.random.split(rng)
  grad_sum, aux = clipped_gradient_sum(per_example_loss, params, batch, loss_rng,
                                       clip_norm=clip_norm, clipping=clipping, mask=mask,
                                       head=head)
  if denominator is None:
    denominator = _batch_size(batch)
  grads = add_noise(grad_sum, noise_rng, clip_norm=clip_norm,
                    noise_multiplier=noise_multiplier, denominator=denominator)
  return grads, aux
