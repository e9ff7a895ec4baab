"""Which training examples make up each step's batch: shuffled fixed-size batches, or Poisson.

``ShuffledBatches``: every epoch a fresh permutation of the train split drawn from (seed,
epoch), cut into ``batch_size`` pieces (the remainder is dropped, a different one each epoch).

``PoissonBatches`` (DP-SGD's default): at every step each example joins the batch independently
with probability ``sample_rate``, the sampling that DP-SGD's accountant assumes. The batch's size
varies, so it is padded to a fixed ``cap`` with ``mask`` = 0 rows (one compiled step for every
batch). ``poisson_batch_cap`` picks a cap that a batch exceeds with negligible probability over
the whole run; a batch that would exceed it anyway is truncated to a uniformly random ``cap`` of
its examples ("truncated Poisson sampling", as in Chua et al., 2024, "Scalable DP-SGD: Shuffling
vs. Poisson Subsampling"), and ``deepflow.privacy`` adds that event's probability to delta.

Both are random-access: batch ``s`` is a pure function of (seed, s), so a resumed run sees
exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import functools
import math
import sys
from typing import Any

import jax
import numpy as np

from deepflow import parallel
from deepflow.registry import ConfigError

# The automatic Poisson cap keeps the probability that any step's batch overflows it below
# this fraction of delta, so truncation costs the guarantee a negligible amount.
OVERFLOW_FRACTION_OF_DELTA = 1e-6


class ShuffledBatches:
  """Random access to the global batches of example indices: batch ``s`` of epoch ``e`` is a
  slice of the permutation drawn from (seed, e). One vectorized permutation per epoch, instead
  of a per-element index shuffle (Grain's ``MapDataset.shuffle``), keeps the host cost of a
  batch in microseconds."""

  def __init__(self, num_examples: int, batch_size: int, seed: int):
    if batch_size > num_examples:
      raise ConfigError(f"data.batch_size={batch_size} is larger than the train split "
                        f"({num_examples} examples)")
    self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
    self.steps_per_epoch = num_examples // batch_size

  def __len__(self) -> int:
    return sys.maxsize  # repeats forever

  @functools.lru_cache(maxsize=2)
  def permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

  def __getitem__(self, step: int) -> tuple[np.ndarray, None]:
    """(indices, mask): every row is an example, so no mask."""
    epoch, i = divmod(int(step), self.steps_per_epoch)
    return self.permutation(epoch)[i * self.batch_size:(i + 1) * self.batch_size], None


class PoissonBatches:
  """Batch ``s``: each of ``num_examples`` examples independently with probability
  ``sample_rate`` (drawn from (seed, s)), as ``cap`` indices and a 0/1 mask of the real rows."""

  def __init__(self, num_examples: int, sample_rate: float, cap: int, seed: int):
    self.num_examples, self.sample_rate, self.cap, self.seed = (num_examples, sample_rate, cap,
                                                                 seed)
    self.batch_size = cap  # rows per batch, real or padding

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    # A stream of its own ([seed, step, 2]): the transforms' per-batch randomness uses
    # [seed, step, 0].
    rng = np.random.default_rng([self.seed, int(step), 2])
    chosen = np.flatnonzero(rng.random(self.num_examples) < self.sample_rate)
    if len(chosen) > self.cap:  # truncation (see the module docstring)
      chosen = np.sort(rng.choice(chosen, self.cap, replace=False))
    indices = np.zeros(self.cap, np.int64)
    indices[:len(chosen)] = chosen
    mask = np.zeros(self.cap, np.float32)
    mask[:len(chosen)] = 1.0
    return indices, mask


def overflow_probability(num_examples: int, sample_rate: float, cap: int, steps: int) -> float:
  """Probability that some step of ``steps`` samples more than ``cap`` examples (a union bound
  over the steps of the Binomial(num_examples, sample_rate) tail)."""
  from scipy import stats  # only Poisson-sampled (private) runs need it
  return min(1.0, steps * float(stats.binom.sf(cap, num_examples, sample_rate)))


def poisson_batch_cap(num_examples: int, sample_rate: float, steps: int, delta: float,
                      multiple: int = 1) -> int:
  """The smallest multiple of ``multiple`` whose ``overflow_probability`` over ``steps`` steps
  is at most ``OVERFLOW_FRACTION_OF_DELTA * delta``."""
  return binomial_bound(num_examples, sample_rate,
                        OVERFLOW_FRACTION_OF_DELTA * delta / max(steps, 1), multiple)


def binomial_bound(num_examples: int, sample_rate: float, tail: float, multiple: int = 1) -> int:
  """The smallest multiple of ``multiple`` that a Binomial(num_examples, sample_rate) batch
  exceeds with probability at most ``tail``."""
  from scipy import stats  # only Poisson-sampled (private) runs need it
  cap = int(stats.binom.isf(tail, num_examples, sample_rate))
  while cap < num_examples and stats.binom.sf(cap, num_examples, sample_rate) > tail:
    cap += 1  # isf is computed in floating point; settle the boundary exactly
  cap = max(1, min(cap, num_examples))
  return -(-cap // multiple) * multiple


def poisson_sampled(config: Any) -> bool:
  """Whether this config's training batches are Poisson-sampled (DP-SGD's default)."""
  return bool(config.privacy.enabled) and config.privacy.sampling == "poisson"


def batch_multiple(config: Any) -> int:
  """What every training batch's size must divide by: the processes, and the devices of the
  data axis in each micro-batch."""
  return math.lcm(jax.process_count(),
                  config.train.microbatches * parallel.data_axis_size(config.mesh))


def poisson_cap(config: Any, num_examples: int) -> int:
  """The fixed size of this config's Poisson batches: ``privacy.max_batch_size``, or (0) the
  automatic ``poisson_batch_cap``."""
  if config.privacy.max_batch_size:
    return int(config.privacy.max_batch_size)
  return poisson_batch_cap(num_examples, config.data.batch_size / num_examples,
                           config.train.steps, config.privacy.delta, batch_multiple(config))


def train_sampler(config: Any, num_examples: int) -> ShuffledBatches | PoissonBatches:
  """The sampler a config trains with: Poisson under DP-SGD (unless ``privacy.sampling`` is
  'shuffle'), shuffled fixed-size batches otherwise."""
  if poisson_sampled(config):
    return PoissonBatches(num_examples, config.data.batch_size / num_examples,
                          poisson_cap(config, num_examples), config.seed)
  return ShuffledBatches(num_examples, config.data.batch_size, config.seed)
