"""Differential privacy for deepflow runs: the public accountant, and DP-SGD from a config.

The accountant (``compute_epsilon``, ``noise_multiplier_for_epsilon``, ``max_steps_for_epsilon``)
and the mechanism (``private_gradients``, ``clipped_gradient_sum``, ``add_noise``) are
implemented once, in ``deepflow.optim.privacy``, and re-exported here as the public API::

  from deepflow.privacy import compute_epsilon
  compute_epsilon(noise_multiplier=1.1, sample_rate=256 / 60000, steps=14000, delta=1e-5)

``DpSgd`` is what a task needs from the config's ``privacy`` section: the noise multiplier
(given, or calibrated to ``target_epsilon``), the per-example clipped and noised gradients of a
(micro-)batch, and the epsilon spent after a number of steps. ``Task.grads`` uses it when
``privacy.enabled`` is set; the loop logs ``privacy/epsilon`` with every train log and eval.

What is and is not accounted, stated honestly:

* Sampling. deepflow's loader cuts fixed-size batches from a fresh shuffle of the train split
  every epoch (sampling without replacement), not Poisson subsampling. The epsilon reported is
  that of the Poisson-subsampled Gaussian mechanism with ``sample_rate = batch_size /
  train_size``: the standard approximation (TF Privacy, Opacus and most papers report it), but the
  guarantee is proven for Poisson sampling only, and shuffled batches can be less private than it
  says (Chua et al., 2024, "How Private are DP-SGD Implementations?").
* Only the trained parameters are covered. Train-split metrics (loss, accuracy, per-example
  gradient norms) are computed from raw examples, and statistics that ``data.transforms`` fit on
  the train split (e.g. ``standardize``'s means) are not privatized either; use transforms whose
  fitted values are public (e.g. ``minmax`` over a known pixel range) for a formal guarantee.
* A calibrated noise multiplier depends on ``train.steps``: resuming a run with more steps
  calibrates a different noise, and the accounting (one noise level for all steps) no longer
  describes the run. Start a new workdir instead.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp

from deepflow.optim.privacy import (ACCOUNTANTS, PerExampleLoss, add_noise,
                                    clipped_gradient_sum, compute_epsilon,
                                    max_steps_for_epsilon, noise_multiplier_for_epsilon,
                                    private_gradients)
from deepflow.registry import ConfigError

__all__ = ["ACCOUNTANTS", "DpSgd", "add_noise", "clipped_gradient_sum", "compute_epsilon",
           "max_steps_for_epsilon", "noise_multiplier_for_epsilon", "private_gradients",
           "validate_config"]

PyTree = Any
log = logging.getLogger("deepflow")

# Regularizers that build a training example from several (mixup, cutmix): one example then
# changes two clipped gradients, which doubles the sensitivity the accountant assumes.
MIXING_REGULARIZERS = ("mixup", "cutmix")


def validate_config(config: Any) -> None:
  """Checks of the ``privacy`` section (and what it conflicts with) that need no data."""
  p = config.privacy
  if not p.clip_norm > 0:
    raise ConfigError(f"privacy.clip_norm must be > 0 (the per-example gradient bound), got "
                      f"{p.clip_norm}")
  if p.noise_multiplier < 0 or p.target_epsilon < 0:
    raise ConfigError(f"privacy.noise_multiplier and privacy.target_epsilon must be >= 0, got "
                      f"{p.noise_multiplier} and {p.target_epsilon}")
  if not 0 < p.delta < 1:
    raise ConfigError(f"privacy.delta must be in (0, 1), got {p.delta}")
  if p.accountant not in ACCOUNTANTS:
    raise ConfigError(f"unknown privacy.accountant {p.accountant!r}; known: "
                      f"{', '.join(ACCOUNTANTS)}")
  # Clipping twice would bound the noised mean a second time: harmless for privacy, but it
  # silently changes the update; one clip (per example) is what DP-SGD means.
  if config.optimizer.clip_norm:
    raise ConfigError("privacy.enabled clips each example's gradient to privacy.clip_norm; set "
                      "optimizer.clip_norm=0 (no second, global clip)")
  for entry in config.regularizers:
    if entry["name"] in MIXING_REGULARIZERS:
      raise ConfigError(f"regularizer {entry['name']!r} mixes examples, which breaks DP-SGD's "
                        f"per-example bound; drop it with privacy.enabled")


@dataclasses.dataclass(frozen=True)
class DpSgd:
  """DP-SGD as configured for one run (see the module docstring for what is accounted).

  ``microbatches``: the train step averages the gradients of this many micro-batches. Each
  micro-batch gets independent noise of std ``noise_multiplier * clip_norm / sqrt(microbatches)``
  on its clipped sum, so the step's total noise is exactly ``N(0, (noise_multiplier *
  clip_norm)^2)`` on the sum of all clipped gradients: the same mechanism (in distribution) as
  summing every micro-batch first and adding the noise once."""
  clip_norm: float
  noise_multiplier: float
  sample_rate: float
  delta: float
  accountant: str = "rdp"
  microbatches: int = 1

  @classmethod
  def from_config(cls, config: Any, train_size: int) -> "DpSgd":
    """From ``config.privacy`` and the train split's size: calibrates the noise to
    ``target_epsilon`` (when noise_multiplier is 0) and refuses a run that would exceed it."""
    validate_config(config)
    p, steps = config.privacy, config.train.steps
    sample_rate = config.data.batch_size / train_size
    if p.delta >= 1 / train_size:
      raise ConfigError(f"privacy.delta={p.delta:g} must be below 1/train_size = "
                        f"{1 / train_size:.3g}: at delta >= 1/n a mechanism may reveal a whole "
                        f"example")
    noise = float(p.noise_multiplier)
    if p.target_epsilon and not noise:
      noise = noise_multiplier_for_epsilon(p.target_epsilon, sample_rate, steps, p.delta,
                                           p.accountant)
      log.info("privacy: noise_multiplier %.4f reaches epsilon %g (delta %g) in %d steps at "
               "sample rate %.4g", noise, p.target_epsilon, p.delta, steps, sample_rate)
    dp = cls(float(p.clip_norm), noise, sample_rate, float(p.delta), p.accountant,
             config.train.microbatches)
    spent = dp.epsilon(steps)
    if p.target_epsilon and spent > p.target_epsilon:
      fit = max_steps_for_epsilon(p.target_epsilon, noise, sample_rate, p.delta, p.accountant)
      raise ConfigError(f"privacy.target_epsilon={p.target_epsilon:g} would be exceeded: "
                        f"train.steps={steps} at noise_multiplier {noise:g} and sample rate "
                        f"{sample_rate:.4g} spend epsilon {spent:.4g} (delta {p.delta:g}); at most "
                        f"{fit} steps fit, or set privacy.noise_multiplier=0 to calibrate it")
    if math.isinf(spent):
      log.warning("privacy: noise_multiplier is 0 and no target_epsilon is set: gradients are "
                  "clipped but not noised, so epsilon is infinite (not private)")
    return dp

  # -- in the train step -------------------------------------------------------------------------

  def gradients(self, per_example_loss: PerExampleLoss, params: PyTree, batch: PyTree,
                rng: jax.Array) -> tuple[PyTree, dict[str, jax.Array]]:
    """(noised mean gradient of this micro-batch, metrics): ``loss`` and the per-example aux
    values averaged over the batch, ``privacy/example_grad_norm`` (mean per-example norm before
    clipping) and ``privacy/clipped_fraction``."""
    grads, aux = private_gradients(per_example_loss, params, batch, rng,
                                   clip_norm=self.clip_norm,
                                   noise_multiplier=self.noise_multiplier /
                                   math.sqrt(self.microbatches))
    size = aux["loss"].shape[0]
    metrics = {"loss": jnp.mean(aux["loss"]),
               **{k: jnp.mean(v) for k, v in (aux["aux"] or {}).items()},
               "privacy/example_grad_norm": jnp.mean(aux["grad_norms"]),
               "privacy/clipped_fraction": aux["num_clipped"].astype(jnp.float32) / size}
    return grads, metrics

  # -- on the host -------------------------------------------------------------------------------

  @functools.lru_cache(maxsize=8)
  def epsilon(self, steps: int) -> float:
    """Epsilon (for ``delta``) spent by ``steps`` steps; inf without noise."""
    return compute_epsilon(self.noise_multiplier, self.sample_rate, int(steps), self.delta,
                           self.accountant)

  def metrics(self, step: int) -> dict[str, float]:
    """What the loop logs with every train log and eval: the budget spent so far."""
    return {"privacy/epsilon": self.epsilon(step), "privacy/delta": self.delta,
            "privacy/noise_multiplier": self.noise_multiplier}
