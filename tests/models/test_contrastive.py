"""Contrastive CNN: representation and projection shapes, and NT-Xent against a numpy loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepflow.models import contrastive
from deepflow.registry import MODELS

# rbg keys: their initialisers compile several times faster than threefry's on CPU
KEY = jax.random.key(0, impl="rbg")


def test_features_and_projection_shapes():
  model = MODELS.get("contrastive_cnn")(10, widths=(8, 16), projection_hidden=12,
                                        projection_dim=6)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8, 8, 1)), jnp.float32)
  variables = model.init(KEY, x)
  assert "batch_stats" in variables
  assert model.apply(variables, x).shape == (4, 6)
  assert model.apply(variables, x, method="features").shape == (4, 16)
  _, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert not np.allclose(jax.tree.leaves(updated)[0], jax.tree.leaves(variables["batch_stats"])[0])


def nt_xent_reference(z1, z2, temperature):
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  n = len(z1)
  total = 0.0
  for i in range(2 * n):
    positive = (i + n) % (2 * n)
    sims = {k: np.dot(z[i], z[k]) / temperature for k in range(2 * n) if k != i}
    total += -np.log(np.exp(sims[positive]) / sum(np.exp(s) for s in sims.values()))
  return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 2.0])
def test_nt_xent_matches_numpy_loop(temperature):
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) * 4
  got = contrastive.nt_xent_loss(jnp.asarray(z1), jnp.asarray(z2), temperature)
  np.testing.assert_allclose(got, nt_xent_reference(z1, z2, temperature), rtol=1e-5)


def test_nt_xent_rewards_matching_views():
  z = jnp.eye(4)
  assert contrastive.nt_xent_loss(z, 3 * z, 0.1) < 0.01
  assert contrastive.nt_xent_loss(z, jnp.roll(z, 1, axis=0), 0.1) > 5.0
