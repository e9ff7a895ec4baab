"""Differentially private SGD: per-example clipped, noised gradients, and the privacy budget.

Two halves, as in Abadi et al. (2016):

* the mechanism, pure JAX for the train step: ``clipped_gradient_sum`` (per-example gradients,
  each clipped to global L2 norm ``clip_norm``, summed) then ``add_noise`` (Gaussian noise of std
  ``noise_multiplier * clip_norm`` on the sum, divided by the batch size); ``private_gradients``
  composes them for the common one-batch step;
* the accountant, host-side: ``compute_epsilon`` and its inverses over dp-accounting's RDP or PLD
  accountants, for a Poisson-subsampled Gaussian mechanism repeated ``steps`` times.

The step computes the clipped sum itself (rather than handing per-example gradients to
``optax.contrib.differentially_private_aggregate`` or ``optax.per_example_global_norm_clip``)
for three reasons: it needs the per-example norms for metrics, a split between summing and
noising for gradient accumulation, and speed. Those optax pieces take the per-example gradients
materialized, a (batch x parameters) array that dominates the step on CPU (allocating and
reading it costs far more than the arithmetic); here the norms come from a vmapped gradient that
XLA reduces as it goes, and the clipped sum from one ordinary backward pass of the loss weighted
per example by its clip factor (a factor held constant, so the sum of weighted gradients is
exactly the sum of clipped ones).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import dp_accounting
import jax
import jax.numpy as jnp
import optax

from deepflow.registry import ConfigError

PyTree = Any
PerExampleLoss = Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, Any]]

ACCOUNTANTS = ("rdp", "pld")


# ----------------------------------------------------------------------------------------------
# Accounting
# ----------------------------------------------------------------------------------------------

def _make_accountant(name: str) -> dp_accounting.PrivacyAccountant:
  if name == "rdp":
    return dp_accounting.rdp.RdpAccountant()
  if name == "pld":
    return dp_accounting.pld.PLDAccountant()
  raise ConfigError(f"unknown privacy accountant {name!r}; known: {', '.join(ACCOUNTANTS)}")


def _dp_sgd_event(noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
  """One DP-SGD run: ``steps`` Poisson-sampled Gaussian mechanisms."""
  step = dp_accounting.PoissonSampledDpEvent(
      sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
  return dp_accounting.SelfComposedDpEvent(step, steps)


def _check(sample_rate: float, delta: float, accountant: str) -> None:
  if not 0 <= sample_rate <= 1:
    raise ConfigError(f"sample_rate must be in [0, 1] (batch size / dataset size); got "
                      f"{sample_rate}")
  if not 0 < delta < 1:
    raise ConfigError(f"delta must be in (0, 1); got {delta}")
  _make_accountant(accountant)  # validates the name


def compute_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                    accountant: str = "rdp") -> float:
  """Epsilon of DP-SGD after ``steps`` steps at sampling rate ``sample_rate``, for ``delta``.

  ``accountant`` is 'rdp' (Renyi DP; fast, slightly loose) or 'pld' (privacy loss
  distributions; tighter, slower for many steps). No noise gives ``inf``; no steps (or
  ``sample_rate = 0``) gives 0.
  """
  _check(sample_rate, delta, accountant)
  if noise_multiplier < 0 or steps < 0:
    raise ConfigError(f"noise_multiplier and steps must be >= 0; got {noise_multiplier}, {steps}")
  if steps == 0 or sample_rate == 0:
    return 0.0
  if noise_multiplier == 0:
    return math.inf
  acc = _make_accountant(accountant)
  acc.compose(dp_accounting.PoissonSampledDpEvent(
      sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), int(steps))
  return float(acc.get_epsilon(delta))


def noise_multiplier_for_epsilon(target_epsilon: float, sample_rate: float, steps: int,
                                 delta: float, accountant: str = "rdp",
                                 tol: float = 1e-4) -> float:
  """The smallest noise multiplier (within ``tol``) whose epsilon is at most ``target_epsilon``.

  Uses ``dp_accounting.calibrate_dp_mechanism`` (root finding that guarantees the returned
  value meets the budget) on a bracket found here by doubling/halving from 1.
  """
  _check(sample_rate, delta, accountant)
  if target_epsilon <= 0:
    raise ConfigError(f"target_epsilon must be > 0; got {target_epsilon}")
  if steps <= 0 or sample_rate == 0:
    return 0.0

  def eps(z: float) -> float:
    return compute_epsilon(z, sample_rate, steps, delta, accountant)

  lo, hi = 0.5, 1.0
  while eps(hi) > target_epsilon:
    lo, hi = hi, 2 * hi
    if hi > 1e6:
      raise ConfigError(f"no noise multiplier up to 1e6 reaches epsilon {target_epsilon}")
  while lo > tol and eps(lo) <= target_epsilon:
    lo, hi = lo / 2, lo
  if lo <= tol:
    return hi  # even almost no noise meets the budget
  return float(dp_accounting.calibrate_dp_mechanism(
      lambda: _make_accountant(accountant),
      lambda z: _dp_sgd_event(z, sample_rate, steps),
      target_epsilon, delta,
      bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi), tol=tol))


def max_steps_for_epsilon(target_epsilon: float, noise_multiplier: float, sample_rate: float,
                          delta: float, accountant: str = "rdp") -> int:
  """The largest number of steps whose epsilon is at most ``target_epsilon`` (0 if none)."""
  _check(sample_rate, delta, accountant)
  if target_epsilon <= 0:
    raise ConfigError(f"target_epsilon must be > 0; got {target_epsilon}")

  def eps(steps: int) -> float:
    return compute_epsilon(noise_multiplier, sample_rate, steps, delta, accountant)

  if eps(1) > target_epsilon:
    return 0
  lo, hi = 1, 2
  while eps(hi) <= target_epsilon:
    lo, hi = hi, 2 * hi
    if hi > 2**40:
      raise ConfigError(f"epsilon {target_epsilon} is never exhausted (noise_multiplier "
                        f"{noise_multiplier}, sample_rate {sample_rate})")
  steps = int(dp_accounting.calibrate_dp_mechanism(
      lambda: _make_accountant(accountant),
      lambda n: _dp_sgd_event(noise_multiplier, sample_rate, n),
      target_epsilon, delta,
      bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi), discrete=True))
  # The calibration is exact to within one step; settle the boundary explicitly.
  while steps > lo and eps(steps) > target_epsilon:
    steps -= 1
  while eps(steps + 1) <= target_epsilon:
    steps += 1
  return steps


# ----------------------------------------------------------------------------------------------
# Mechanism
# ----------------------------------------------------------------------------------------------

def _batch_size(batch: PyTree) -> int:
  sizes = {leaf.shape[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(batch)}
  if len(sizes) != 1 or None in sizes:
    raise ConfigError(f"every leaf of the batch needs the same leading (batch) axis; got sizes "
                      f"{sorted(map(str, sizes))}")
  return sizes.pop()


def clipped_gradient_sum(per_example_loss: PerExampleLoss, params: PyTree, batch: PyTree,
                         rng: jax.Array, *, clip_norm: float) -> tuple[PyTree, dict[str, Any]]:
  """Sum over the batch of per-example gradients, each clipped to global L2 norm ``clip_norm``.

  ``per_example_loss(params, example, rng) -> (loss, aux)`` sees one example (every leaf of
  ``batch`` without its leading axis) and its own key, split from ``rng``. Returns
  ``(clipped_sum, aux)`` with ``aux = {'loss': (B,), 'aux': per-example aux, 'grad_norms': (B,)
  norms before clipping, 'num_clipped': scalar}``. Padding examples should have zero loss so
  that they contribute zero gradient.

  Two passes (see the module docstring): the per-example gradient norms ``n_i``, then the
  gradient of ``sum_i c_i loss_i`` with ``c_i = min(1, clip_norm / n_i)`` held constant, which is
  ``sum_i c_i grad_i``. Each example sees the same key in both passes (same dropout mask).
  """
  size = _batch_size(batch)
  keys = jax.random.split(rng, size)
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
                      denominator: float | None = None) -> tuple[PyTree, dict[str, Any]]:
  """DP-SGD gradients of one batch: clip per example, sum, add noise, divide by the batch size.

  ``denominator`` defaults to the batch's leading size; with Poisson sampling pass the expected
  batch size instead. Returns ``(grads, aux)`` as ``clipped_gradient_sum`` does. With
  ``noise_multiplier = 0`` and a clip norm above every gradient norm this is ``jax.grad`` of the
  mean loss.

  Under ``jax.jit`` with the batch sharded over devices the sum is global (XLA inserts the
  all-reduce) and the noise is drawn once from a replicated key, so every device applies the same
  update and the result equals the single-device one. For gradient accumulation, add up
  ``clipped_gradient_sum`` over micro-batches (distinct keys, e.g. ``fold_in(rng, i)``) and call
  ``add_noise`` once on the total: noise per micro-batch would over-noise the step.
  """
  loss_rng, noise_rng = jax.random.split(rng)
  grad_sum, aux = clipped_gradient_sum(per_example_loss, params, batch, loss_rng,
                                       clip_norm=clip_norm)
  if denominator is None:
    denominator = _batch_size(batch)
  grads = add_noise(grad_sum, noise_rng, clip_norm=clip_norm,
                    noise_multiplier=noise_multiplier, denominator=denominator)
  return grads, aux
