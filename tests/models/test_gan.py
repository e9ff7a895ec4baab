"""DCGAN: shapes, the two parameter sub-trees, conditioning, and the loss formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepflow.models import gan
from deepflow.registry import ConfigError, MODELS

# rbg keys: their initialisers compile several times faster than threefry's on CPU
KEY = jax.random.key(0, impl="rbg")


def test_generate_discriminate_shapes_and_subtrees():
  model = MODELS.get("dcgan")(10, latent_dim=8, features=8)
  x = jnp.ones((3, 8, 8, 1))
  variables = model.init(KEY, x)
  for collection in ("params", "batch_stats"):
    assert set(variables[collection]) == {"generator", "discriminator"}
  z = jnp.asarray(np.random.default_rng(1).normal(size=(5, 8)), jnp.float32)
  images = model.apply(variables, z, method="generate")
  assert images.shape == (5, 8, 8, 1)
  assert model.apply(variables, images, method="discriminate").shape == (5,)
  assert model.apply(variables, x).shape == (3,)
  _, updated = model.apply(variables, z, train=True, method="generate", mutable=["batch_stats"])
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["batch_stats"],
                         updated["batch_stats"])
  assert all(jax.tree.leaves(changed["generator"]))
  assert not any(jax.tree.leaves(changed["discriminator"]))


def test_class_conditioning():
  model = gan.DCGAN(10, latent_dim=8, num_classes=4, features=8)
  x, labels = jnp.ones((2, 8, 8, 1)), jnp.array([0, 3])
  variables = model.init(KEY, x, labels)
  z = jnp.ones((2, 8))
  images = model.apply(variables, z, labels, method="generate")
  assert not np.allclose(images[0], images[1])  # same latent, different class
  logits = model.apply(variables, x, labels, method="discriminate")
  assert not np.isclose(logits[0], logits[1])  # same image, different class
  with pytest.raises(ConfigError, match="needs labels"):
    model.apply(variables, z, method="generate")


def test_other_image_shapes():
  model = gan.DCGAN(10, image_shape=(16, 12, 3), latent_dim=8, num_classes=4, features=8)
  x, labels = jnp.ones((2, 16, 12, 3)), jnp.array([0, 3])
  variables = jax.eval_shape(model.init, KEY, x, labels)  # shapes only: nothing is compiled
  generate = lambda v, z, y: model.apply(v, z, y, method="generate")  # noqa: E731
  assert jax.eval_shape(generate, variables, jnp.ones((2, 8)), labels).shape == (2, 16, 12, 3)
  with pytest.raises(ConfigError, match="divisible by 4"):
    jax.eval_shape(gan.DCGAN(10, image_shape=(6, 6, 1)).init, KEY, jnp.ones((1, 6, 6, 1)))


def test_loss_formulas():
  rng = np.random.default_rng(0)
  real, fake = rng.normal(size=7) * 3, rng.normal(size=5) * 3
  sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
  np.testing.assert_allclose(gan.discriminator_loss(real, fake, "non_saturating"),
                             np.mean(-np.log(sigmoid(real))) + np.mean(-np.log(1 - sigmoid(fake))),
                             rtol=1e-5)
  np.testing.assert_allclose(gan.generator_loss(fake, "non_saturating"),
                             np.mean(-np.log(sigmoid(fake))), rtol=1e-5)
  np.testing.assert_allclose(gan.discriminator_loss(real, fake, "hinge"),
                             np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake)),
                             rtol=1e-5)
  np.testing.assert_allclose(gan.generator_loss(fake, "hinge"), -np.mean(fake), rtol=1e-5)
  with pytest.raises(ConfigError, match="wasserstein"):
    gan.generator_loss(fake, "wasserstein")
