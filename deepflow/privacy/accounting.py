"""The privacy accountant: epsilon of DP-SGD, and its inverses, over dp-accounting.

DP-SGD is ``steps`` compositions of a Poisson-subsampled Gaussian mechanism (each example joins
a step's batch independently with probability ``sample_rate``; Gaussian noise of std
``noise_multiplier * clip_norm`` on the sum of clipped gradients). ``compute_epsilon`` accounts
for exactly that, with dp-accounting's RDP (fast, slightly loose) or PLD (tighter, slower)
accountant; ``noise_multiplier_for_epsilon`` and ``max_steps_for_epsilon`` invert it.

``truncation_delta`` bounds what truncating the rare Poisson batch larger than its fixed shape
costs (``deepflow.data.sampler`` draws the batches).
"""
from __future__ import annotations

import math

import dp_accounting

from deepflow.registry import ConfigError

ACCOUNTANTS = ("rdp", "pld")


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



def truncation_delta(epsilon: float, overflow: float) -> float:
  """What truncating an overflowing Poisson batch adds to delta: the truncated run differs from
  the untruncated one only on an overflow event, of probability at most ``overflow`` on either
  of two neighbouring datasets, so an (epsilon, delta) guarantee becomes (epsilon, delta +
  (1 + e^epsilon) * overflow)."""
  if overflow == 0:
    return 0.0
  return math.inf if epsilon > 700 else (1 + math.exp(epsilon)) * overflow
