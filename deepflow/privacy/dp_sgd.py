"""DP-SGD as a config's ``privacy`` section describes it: ``validate_config`` and ``DpSgd``.

``DpSgd`` holds the noise multiplier (given, or calibrated to ``target_epsilon``), computes the
per-example clipped and noised gradients of a (micro-)batch in the train step, and the epsilon
spent after a number of steps on the host. The train step differentiates through it when
``privacy.enabled`` is set (``deepflow.train.gradients.private``); the loop logs ``privacy/epsilon`` with every train log and eval.

What is and is not accounted, stated honestly:

* Sampling. By default (``privacy.sampling='poisson'``) each training example joins a step's
  batch independently with probability ``q = batch_size / train_size``
  (``deepflow.data.sampler``), which is the sampling the accountant's Poisson-subsampled Gaussian
  mechanism describes. Batches are padded to a fixed size (``privacy.max_batch_size``, by default
  one exceeded with probability below ``1e-6 * delta`` over the run) with masked rows that
  contribute nothing; the rare larger batch is truncated, and the guarantee becomes (epsilon,
  delta + ``privacy/truncation_delta``), logged with every epsilon. The noised sum is divided by
  the expected batch size ``batch_size``. Where the batch is not split (one process, a data axis
  of 1, no micro-batches) the rows past the size that 99% of batches stay within are computed
  only in the steps that sample into them (``DpSgd.head``), so a step's time says whether its batch was that large: a timing
  channel on the batch size, outside the accounted mechanism as with any variable-size batch
  (Opacus's included). ``privacy.sampling='shuffle'`` trains on fixed-size
  batches cut from a fresh shuffle every epoch instead; the epsilon reported is then the Poisson
  one, an approximation (TF Privacy, Opacus and many papers report it) that shuffled batches may
  not meet (Chua et al., 2024, "How Private are DP-SGD Implementations?"), and the logs say so
  with ``privacy/epsilon_is_approximate`` = 1.
* Clipping. ``privacy.clipping`` picks how each example's gradient norm and the clipped sum are
  computed (``deepflow.privacy.mechanism``): from covered layers' inputs and output gradients
  ('ghost': the layers ``deepflow.privacy.ghost_layers`` covers; ``deepflow.privacy.ghost``),
  from vmapped per-example gradients ('vmap'), or ghost whenever every parameter is in such a
  layer ('auto'). The mechanism, hence the guarantee, is the same.
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

from deepflow.data import sampler
from deepflow.data.pipeline import MASK
from deepflow.privacy.accounting import (ACCOUNTANTS, compute_epsilon, max_steps_for_epsilon,
                                         noise_multiplier_for_epsilon, truncation_delta)
from deepflow.privacy.mechanism import CLIPPINGS, PerExampleLoss, private_gradients
from deepflow.registry import ConfigError

PyTree = Any
log = logging.getLogger("deepflow")

# Regularizers that build a training example from several (mixup, cutmix): one example then
# changes two clipped gradients, which doubles the sensitivity the accountant assumes.
MIXING_REGULARIZERS = ("mixup", "cutmix")
SAMPLINGS = ("poisson", "shuffle")
# A Poisson batch's rows past the size that all but this fraction of batches stay within are
# computed only in the steps that sample into them (``DpSgd.head``).
HEAD_TAIL = 0.01


def validate_config(config: Any) -> None:
  """Checks of the ``privacy`` section (and what it conflicts with) that need no data; run by
  ``deepflow.config`` when a config is finalized."""
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
  if p.clipping not in CLIPPINGS:
    raise ConfigError(f"privacy.clipping must be one of {', '.join(CLIPPINGS)}, got "
                      f"{p.clipping!r}")
  if p.sampling not in SAMPLINGS:
    raise ConfigError(f"privacy.sampling must be one of {', '.join(SAMPLINGS)}, got "
                      f"{p.sampling!r}")
  multiple = sampler.batch_multiple(config)
  if p.max_batch_size and (p.max_batch_size < config.data.batch_size
                           or p.max_batch_size % multiple):
    raise ConfigError(f"privacy.max_batch_size={p.max_batch_size} must be 0 (automatic) or at "
                      f"least data.batch_size={config.data.batch_size} and a multiple of "
                      f"{multiple} (processes x micro-batches x data-axis devices)")
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
  summing every micro-batch first and adding the noise once.

  ``overflow``: the probability that some Poisson batch of the run exceeds its fixed size and is
  truncated (0 for shuffled batches)."""
  clip_norm: float
  noise_multiplier: float
  sample_rate: float
  delta: float
  accountant: str = "rdp"
  microbatches: int = 1
  sampling: str = "poisson"
  batch_size: int = 1  # the expected (Poisson) or exact (shuffle) examples per step
  overflow: float = 0.0
  clipping: str = "auto"  # how per-example norms are computed (``mechanism.clipped_gradient_sum``)
  head: int = 0  # a Poisson batch's rows always computed; the rest only when sampled into

  @classmethod
  def from_config(cls, config: Any, train_size: int) -> "DpSgd":
    """From ``config.privacy`` (already checked by ``validate_config``) and the train split's
    size: calibrates the noise to ``target_epsilon`` (when noise_multiplier is 0) and refuses a
    run that would exceed it."""
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
    overflow, head = 0.0, 0
    if sampler.poisson_sampled(config):
      overflow = sampler.overflow_probability(train_size, sample_rate,
                                              sampler.poisson_cap(config, train_size), steps)
      # Rows past those that 99% of batches fill are padding in 99% of steps: computed only when
      # needed. Not where the batch is split (micro-batches, data-parallel devices, processes).
      if sampler.batch_multiple(config) == 1:
        head = sampler.binomial_bound(train_size, sample_rate, HEAD_TAIL)
    else:
      log.warning("privacy: sampling='shuffle': the epsilon reported is that of Poisson "
                  "sampling, an approximation for shuffled fixed-size batches")
    dp = cls(float(p.clip_norm), noise, sample_rate, float(p.delta), p.accountant,
             config.train.microbatches, p.sampling, int(config.data.batch_size), overflow,
             p.clipping, head)
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
    values averaged over the batch's real examples, ``privacy/example_grad_norm`` (their mean
    norm before clipping), ``privacy/clipped_fraction`` and, for Poisson batches,
    ``privacy/batch_size`` (how many examples were sampled).

    A Poisson batch (one with a ``mask``) is divided by its expected size, ``batch_size /
    microbatches`` per micro-batch, not by how many examples it holds: that count depends on
    the private data, and the expected size is what DP-SGD's analysis divides by.
    ``per_example_loss`` must give masked rows zero loss (``train.gradients.private`` does), so
    their
    gradient is zero and they are never clipped."""
    mask = batch.get(MASK)
    denominator = None if mask is None else self.batch_size / self.microbatches
    grads, aux = private_gradients(per_example_loss, params, batch, rng,
                                   clip_norm=self.clip_norm,
                                   noise_multiplier=self.noise_multiplier /
                                   math.sqrt(self.microbatches), denominator=denominator,
                                   clipping=self.clipping, mask=mask, head=self.head)
    weights = jnp.ones_like(aux["loss"]) if mask is None else mask
    count = jnp.maximum(jnp.sum(weights), 1.0)

    def mean(values):
      return jnp.sum(weights.reshape(-1, *(1,) * (values.ndim - 1)) * values, axis=0) / count
    metrics = {"loss": mean(aux["loss"]),
               **{k: mean(v) for k, v in (aux["aux"] or {}).items()},
               "privacy/example_grad_norm": mean(aux["grad_norms"]),
               "privacy/clipped_fraction": aux["num_clipped"].astype(jnp.float32) / count}
    if mask is not None:
      metrics["privacy/batch_size"] = jnp.sum(mask)
    return grads, metrics

  # -- on the host -------------------------------------------------------------------------------

  @functools.lru_cache(maxsize=8)
  def epsilon(self, steps: int) -> float:
    """Epsilon (for ``delta``) spent by ``steps`` steps; inf without noise."""
    return compute_epsilon(self.noise_multiplier, self.sample_rate, int(steps), self.delta,
                           self.accountant)

  def metrics(self, step: int) -> dict[str, float]:
    """What the loop logs with every train log and eval: the budget spent so far, and how to
    read it (the truncation's extra delta for Poisson batches; a flag for shuffled ones)."""
    epsilon = self.epsilon(step)
    out = {"privacy/epsilon": epsilon, "privacy/delta": self.delta,
           "privacy/noise_multiplier": self.noise_multiplier}
    if self.sampling == "poisson":
      out["privacy/truncation_delta"] = truncation_delta(epsilon, self.overflow)
    else:
      out["privacy/epsilon_is_approximate"] = 1.0
    return out
