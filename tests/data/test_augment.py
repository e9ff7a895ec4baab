"""Augmentations against their definitions, and deterministic from (seed, step): the same batches
in every run and after resuming the iterator; eval batches untouched."""
import numpy as np
import pytest
from scipy import ndimage

from deepflow.data import augment
from deepflow.data.pipeline import INPUTS, Pipeline
from deepflow.registry import ConfigError
from tests.helpers import tiny_config

IMAGES = np.random.default_rng(0).normal(size=(16, 9, 9, 2)).astype(np.float32)


def apply(transform, x, seed=1):
  assert transform.train_only
  return transform.apply({}, x, np.random.default_rng(seed))


def test_random_crop_is_a_window_of_the_padded_image():
  out = apply(augment.random_crop(padding=2), IMAGES)
  padded = np.pad(IMAGES, ((0, 0), (2, 2), (2, 2), (0, 0)))
  offsets = set()
  for i in range(len(IMAGES)):
    found = [(dy, dx) for dy in range(5) for dx in range(5)
             if np.array_equal(out[i], padded[i, dy:dy + 9, dx:dx + 9])]
    assert found, i
    offsets.add(found[0])
  assert len(offsets) > 4  # offsets differ per example


def test_flip_mirrors_some_examples():
  out = apply(augment.flip(horizontal=True), IMAGES)
  mirrored = [np.array_equal(o, x[:, ::-1]) for o, x in zip(out, IMAGES)]
  same = [np.array_equal(o, x) for o, x in zip(out, IMAGES)]
  assert all(m or s for m, s in zip(mirrored, same)) and 0 < sum(mirrored) < len(IMAGES)


def test_rotate_matches_scipy_rotation_by_the_drawn_angle():
  out = apply(augment.rotate(degrees=30), IMAGES, seed=4)
  angles = np.random.default_rng(4).uniform(-30, 30, len(IMAGES))  # the first draw
  for o, x, a in zip(out, IMAGES, angles):
    np.testing.assert_allclose(o, ndimage.rotate(x, -a, reshape=False, order=1), atol=1e-5)
  identity = augment.affine(rotation=0, translation=0, scale=0)
  np.testing.assert_allclose(apply(identity, IMAGES), IMAGES, atol=1e-6)


def test_affine_translation_shifts_whole_pixels():
  out = apply(augment.affine(rotation=0, translation=0.5), IMAGES[:1], seed=2)
  rng = np.random.default_rng(2)
  rng.uniform(0, 0, 1), rng.uniform(1, 1, 1)
  dy, dx = rng.uniform(-0.5, 0.5, (1, 2))[0] * 9
  np.testing.assert_allclose(out[0], ndimage.shift(IMAGES[0], (dy, dx, 0), order=1), atol=1e-5)


def test_brightness_contrast_formula():
  out = apply(augment.brightness_contrast(brightness=0.3, contrast=0.2), IMAGES, seed=5)
  rng = np.random.default_rng(5)
  factor = rng.uniform(0.8, 1.2, (16, 1, 1, 1))
  shift = rng.uniform(-0.3, 0.3, (16, 1, 1, 1))
  mean = IMAGES.mean(axis=(1, 2, 3), keepdims=True)
  np.testing.assert_allclose(out, (IMAGES - mean) * factor + mean + shift, rtol=1e-5, atol=1e-6)


def test_noise_and_jitter_have_the_configured_spread():
  x = np.zeros((64, 100, 3), np.float32)
  for transform in (augment.gaussian_noise(std=0.2), augment.jitter(std=0.2)):
    assert np.std(apply(transform, x)) == pytest.approx(0.2, rel=0.02)


def test_scaling_is_one_factor_per_example_and_channel():
  x = np.random.default_rng(1).uniform(1, 2, (8, 20, 3)).astype(np.float32)
  ratio = apply(augment.scaling(std=0.1), x) / x
  np.testing.assert_allclose(ratio, ratio[:, :1, :].repeat(20, 1), rtol=1e-5)
  assert np.std(ratio[:, 0, :]) > 0.02
  assert apply(augment.scaling(), x[..., 0]).shape == (8, 20)


def test_window_slice_stretches_a_window_linearly():
  ramp = np.tile(np.arange(21, dtype=np.float32), (6, 1))  # x[t] = t
  np.testing.assert_allclose(apply(augment.window_slice(ratio=1.0), ramp), ramp, atol=1e-5)
  out = apply(augment.window_slice(ratio=0.5), ramp)
  np.testing.assert_allclose(np.diff(out, axis=1), 0.5, atol=1e-5)  # a window of 10 over 20 steps
  assert (out[:, 0] >= 0).all() and (out[:, -1] <= 20).all()
  assert len(set(out[:, 0].round(4))) > 1


def test_bad_options_and_shapes_are_config_errors():
  with pytest.raises(ConfigError, match="padding"):
    augment.random_crop(padding=-1)
  with pytest.raises(ConfigError, match=r"\(B, H, W, C\)"):
    apply(augment.flip(), np.zeros((4, 8)))
  with pytest.raises(ConfigError, match="ratio"):
    augment.window_slice(ratio=0)


def pipeline_config(seed=0, augmentations=True):
  return tiny_config(seed=seed, data__batch_size=16, data__num_threads=1, data__transforms=[
      dict(name="standardize")] + ([
      dict(name="random_crop", padding=1), dict(name="affine", rotation=10, scale=0.1),
      dict(name="brightness_contrast"), dict(name="gaussian_noise", std=0.1)]
      if augmentations else []))


def take(iterator, n):
  return [next(iterator)[INPUTS] for _ in range(n)]


def test_augmented_batches_are_deterministic_and_resume_exactly():
  pipeline = Pipeline(pipeline_config())
  first = take(pipeline.train_iterator(), 5)
  again = take(Pipeline(pipeline_config()).train_iterator(), 5)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  it = pipeline.train_iterator()
  take(it, 3)
  resumed = take(pipeline.train_iterator(it.get_state()), 2)
  for a, b in zip(first[3:], resumed):
    np.testing.assert_array_equal(a, b)
  other_seed = take(Pipeline(pipeline_config(seed=1)).train_iterator(), 1)[0]
  assert not np.allclose(other_seed, first[0])
  plain = Pipeline(pipeline_config(augmentations=False))
  assert not np.allclose(take(plain.train_iterator(), 1)[0], first[0])
  for a, b in zip(pipeline.eval_batches("test"), plain.eval_batches("test")):
    np.testing.assert_array_equal(a[INPUTS], b[INPUTS])  # eval batches are never augmented
