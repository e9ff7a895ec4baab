"""DP-SGD: clipping, noise, equivalence with plain gradients and sharding; the accountant."""
import functools
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deepflow import privacy
from deepflow.registry import ConfigError

B, D, C = 16, 5, 3


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w": jax.random.normal(k1, (D, C)), "b": jax.random.normal(k2, (C,))}


def _batch(scale=1.0):
  kx, ky = jax.random.split(jax.random.key(1))
  return {"x": scale * jax.random.normal(kx, (B, D)), "y": jax.random.randint(ky, (B,), 0, C)}


def _loss(params, example, rng, *, use_rng=False):
  """Softmax cross-entropy of a linear model on one example; optionally a random loss scale, so
  the per-example keys matter."""
  logits = example["x"] @ params["w"] + params["b"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, example["y"])
  if use_rng:
    loss = loss * (1.0 + 0.1 * jax.random.normal(rng))
  return loss, {"logit_max": jnp.max(logits)}


def test_every_example_is_clipped_and_sums_add_up():
  params, batch, clip = _params(), _batch(scale=10.0), 0.5
  key = jax.random.key(2)
  total, aux = privacy.clipped_gradient_sum(_loss, params, batch, key, clip_norm=clip)
  norms = jax.vmap(lambda ex: optax.tree.norm(jax.grad(lambda p: _loss(p, ex, key)[0])(params)))(
      batch)
  np.testing.assert_allclose(aux["grad_norms"], norms, rtol=1e-5)
  assert (norms > clip).sum() > B // 2  # the check below is not vacuous
  assert int(aux["num_clipped"]) == int((norms > clip).sum())
  assert aux["loss"].shape == (B,) and aux["aux"]["logit_max"].shape == (B,)
  clip_sum = jax.jit(functools.partial(privacy.clipped_gradient_sum, _loss, clip_norm=clip))
  singles = []
  for i in range(B):
    one = jax.tree.map(lambda a: a[i:i + 1], batch)
    g, _ = clip_sum(params, one, key)
    assert float(optax.tree.norm(g)) <= clip + 1e-6
    singles.append(g)
  summed = jax.tree.map(lambda *gs: sum(gs), *singles)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, total, summed)


def test_no_noise_and_huge_clip_is_the_plain_gradient():
  params, batch = _params(), _batch()
  grads, aux = privacy.private_gradients(_loss, params, batch, jax.random.key(3), clip_norm=1e6,
                                         noise_multiplier=0.0)
  mean_loss = lambda p: jnp.mean(jax.vmap(lambda ex: _loss(p, ex, None)[0])(batch))
  expected = jax.grad(mean_loss)(params)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), grads,
               expected)
  assert int(aux["num_clipped"]) == 0


def test_accumulated_halves_match_one_batch():
  kwargs = dict(clip_norm=0.3, noise_multiplier=1.3)

  @jax.jit  # one compilation instead of many eager ones
  def both(params, batch, key):
    whole, _ = privacy.private_gradients(_loss, params, batch, key, **kwargs)
    loss_key, noise_key = jax.random.split(key)
    halves = [jax.tree.map(lambda a: a[s], batch) for s in (slice(0, 6), slice(6, B))]
    sums = [privacy.clipped_gradient_sum(_loss, params, h, jax.random.fold_in(loss_key, i),
                                         clip_norm=kwargs["clip_norm"])[0]
            for i, h in enumerate(halves)]
    total = jax.tree.map(jnp.add, *sums)
    return whole, privacy.add_noise(total, noise_key, denominator=B, **kwargs)

  whole, accumulated = both(_params(), _batch(scale=5.0), jax.random.key(4))
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), whole,
               accumulated)


def test_noise_std_is_multiplier_times_clip_over_batch():
  params = {"a": jnp.zeros((1000,)), "b": jnp.zeros((50, 10))}
  constant = lambda p, ex, rng: (jnp.sum(p["a"]) * 0.0 + ex, None)  # zero gradient
  batch = jnp.zeros((8,))
  # The denominator is configurable (the expected batch size under Poisson sampling).
  draw = jax.jit(jax.vmap(lambda k, denominator: privacy.private_gradients(
      constant, params, batch, k, clip_norm=2.0, noise_multiplier=1.5,
      denominator=denominator)[0], in_axes=(0, None)))
  keys = jax.random.split(jax.random.key(5), 20)
  for denominator in (8.0, 4.0):
    noise = draw(keys, denominator)
    samples = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(noise)])
    assert samples.size == 20 * 1500
    assert np.std(samples) == pytest.approx(1.5 * 2.0 / denominator, rel=0.03)
    assert abs(np.mean(samples)) < 0.01 * 8 / denominator
  # Each leaf, and each key, gets its own draw.
  assert not np.allclose(noise["a"][:, :500], noise["b"].reshape(20, -1))
  assert not np.allclose(noise["a"][0], noise["a"][1])


def test_sharded_over_eight_devices_matches_one_device():
  assert jax.device_count() == 8
  mesh = Mesh(jax.devices(), ("data",))
  params, batch, key = _params(), _batch(scale=3.0), jax.random.key(7)
  step = jax.jit(lambda p, b, k: privacy.private_gradients(
      functools.partial(_loss, use_rng=True), p, b, k, clip_norm=0.5, noise_multiplier=1.1))
  sharded_batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
  replicated = NamedSharding(mesh, P())
  sharded, aux = step(jax.device_put(params, replicated), sharded_batch,
                      jax.device_put(key, replicated))
  single, single_aux = step(params, jax.device_put(batch, jax.devices()[0]), key)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, sharded, single)
  close(aux["grad_norms"], single_aux["grad_norms"])


# ----------------------------------------------------------------------------------------------
# Accounting
# ----------------------------------------------------------------------------------------------

def _direct_epsilon(z, q, steps, delta, accountant):
  acc = (dp_accounting.rdp.RdpAccountant() if accountant == "rdp"
         else dp_accounting.pld.PLDAccountant())
  acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
  return acc.get_epsilon(delta)


@pytest.mark.parametrize("accountant,steps", [("rdp", 1000), ("pld", 50)])
def test_compute_epsilon_equals_dp_accounting(accountant, steps):
  eps = privacy.compute_epsilon(1.2, 0.02, steps, 1e-5, accountant=accountant)
  assert eps == pytest.approx(_direct_epsilon(1.2, 0.02, steps, 1e-5, accountant))


def test_compute_epsilon_reference_and_edge_cases():
  # DP-SGD on MNIST (Abadi et al. 2016 setting): sigma 1.1, batch 256 of 60k, 60 epochs.
  steps = 60 * 60000 // 256
  assert 2.0 < privacy.compute_epsilon(1.1, 256 / 60000, steps, 1e-5) < 4.0
  assert privacy.compute_epsilon(0.0, 0.01, 10, 1e-5) == math.inf
  assert privacy.compute_epsilon(1.0, 0.01, 0, 1e-5) == 0.0
  with pytest.raises(ConfigError, match="accountant"):
    privacy.compute_epsilon(1.0, 0.01, 10, 1e-5, accountant="gdp")
  with pytest.raises(ConfigError, match="delta"):
    privacy.compute_epsilon(1.0, 0.01, 10, 0.0)


def test_noise_multiplier_and_max_steps_round_trip():
  q, steps, delta, target = 0.01, 1000, 1e-5, 2.0
  z = privacy.noise_multiplier_for_epsilon(target, q, steps, delta)
  eps = lambda z_, n=steps: privacy.compute_epsilon(z_, q, n, delta)
  assert eps(z) <= target
  assert eps(z - 1e-3) > target  # the smallest such noise, within tolerance
  assert eps(z) == pytest.approx(target, rel=1e-2)
  n = privacy.max_steps_for_epsilon(target, z, q, delta)
  assert n >= steps
  assert eps(z, n) <= target < eps(z, n + 1)
  assert privacy.max_steps_for_epsilon(target, 0.0, q, delta) == 0
