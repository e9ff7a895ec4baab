"""Poisson sampling for DP-SGD: inclusion probability, fixed shape with a mask, truncation,
the cap's tail bound, and determinism in (seed, step) through the real pipeline."""
import math

import numpy as np
import pytest

from deepflow.data import sampler
from deepflow.data.pipeline import INPUTS, MASK, Pipeline
from tests.helpers import tiny_config

PRIVATE = ("privacy.enabled=True", "data.transforms=[]")  # raw values: rows identify examples


def _chosen(batches, step):
  indices, mask = batches[step]
  return indices[mask > 0]


def test_each_example_joins_each_step_independently_with_probability_q():
  n, q, steps = 200, 0.05, 2000
  batches = sampler.PoissonBatches(n, q, cap=60, seed=0)
  counts = np.zeros(n)
  sizes = []
  for step in range(steps):
    chosen = _chosen(batches, step)
    assert len(set(chosen)) == len(chosen)  # without replacement within a step
    counts[chosen] += 1
    sizes.append(len(chosen))
  # Inclusion frequencies: Binomial(steps, q) per example, std sqrt(steps q (1-q)) ~ 9.7.
  assert abs(counts.mean() - steps * q) < 1.0
  assert np.all(np.abs(counts - steps * q) < 6 * math.sqrt(steps * q * (1 - q)))
  # Batch sizes: Binomial(n, q), mean 10, variance 9.5 (a fixed-size sampler has variance 0).
  assert np.mean(sizes) == pytest.approx(n * q, rel=0.05)
  assert np.var(sizes) == pytest.approx(n * q * (1 - q), rel=0.15)


def test_batches_have_a_fixed_shape_with_padding_masked_and_are_a_function_of_seed_and_step():
  batches = sampler.PoissonBatches(100, 0.1, cap=32, seed=3)
  indices, mask = batches[7]
  assert indices.shape == mask.shape == (32,)
  real = int(mask.sum())
  assert 0 < real < 32 and np.all(mask[:real] == 1) and np.all(mask[real:] == 0)
  again = sampler.PoissonBatches(100, 0.1, cap=32, seed=3)[7]
  np.testing.assert_array_equal(again[0], indices)
  assert not np.array_equal(sampler.PoissonBatches(100, 0.1, cap=32, seed=4)[7][0], indices)
  assert not np.array_equal(batches[8][0], indices)


def test_a_batch_over_the_cap_is_truncated_to_a_random_subset():
  full = sampler.PoissonBatches(100, 0.5, cap=100, seed=0)
  capped = sampler.PoissonBatches(100, 0.5, cap=10, seed=0)
  sampled = set(_chosen(full, 0))
  kept = _chosen(capped, 0)
  assert len(sampled) > 10 and len(kept) == 10
  assert set(kept) <= sampled


def test_the_automatic_cap_bounds_the_overflow_probability():
  n, q, steps, delta = 300, 0.05, 50, 1e-5

  def tail(cap):  # P[Binomial(n, q) > cap], summed exactly
    return sum(math.comb(n, k) * q**k * (1 - q)**(n - k) for k in range(cap + 1, n + 1))
  budget = sampler.OVERFLOW_FRACTION_OF_DELTA * delta
  cap = sampler.poisson_batch_cap(n, q, steps, delta)
  assert steps * tail(cap) <= budget < steps * tail(cap - 1)  # the smallest such cap
  assert sampler.overflow_probability(n, q, cap, steps) == pytest.approx(steps * tail(cap),
                                                                         rel=1e-6)
  rounded = sampler.poisson_batch_cap(n, q, steps, delta, multiple=8)
  assert rounded % 8 == 0 and cap <= rounded < cap + 8


def test_private_pipeline_serves_poisson_batches_that_resume_exactly():
  config = tiny_config(*PRIVATE)
  p = Pipeline(config)
  cap = sampler.poisson_cap(config, len(p.train_source))
  it = p.train_iterator()
  first = [next(it) for _ in range(3)]
  assert {b[INPUTS].shape[0] for b in first} == {cap}  # one shape: one compilation
  sizes = [int(b[MASK].sum()) for b in first]
  assert len(set(sizes)) > 1 and max(sizes) < cap  # sizes vary, padding is masked
  rows = p.train_source.arrays["image"]
  for step, batch in enumerate(first):
    indices, mask = p.sampler[step]
    np.testing.assert_array_equal(batch[INPUTS][mask > 0], rows[indices[mask > 0]])
  state = it.get_state()
  expected = next(it)
  resumed = next(Pipeline(config).train_iterator(state))
  np.testing.assert_array_equal(resumed[INPUTS], expected[INPUTS])
  np.testing.assert_array_equal(resumed[MASK], expected[MASK])


def test_shuffled_sampling_and_non_private_runs_have_no_mask():
  for config in (tiny_config(), tiny_config(*PRIVATE, "privacy.sampling='shuffle'")):
    batch = next(Pipeline(config).train_iterator())
    assert MASK not in batch and batch[INPUTS].shape[0] == 32
