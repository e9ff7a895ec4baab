"""Attribution methods checked against their axioms, plus the heatmap PNG writer."""
import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from deepflow.analysis import attributions as attr
from deepflow.analysis.plots import save_attribution_grid
from deepflow.models.mlp import MLP
from deepflow.registry import ConfigError
from tests.numerics import assert_same_math

D, C, B = 8, 3, 4


def _mlp(ignore_from: int | None = None):
  """A small tanh MLP (smooth, so finite differences and quadrature behave); optionally with
  zero first-layer weights from feature ``ignore_from`` on, so it ignores those features."""
  model = MLP(num_outputs=C, hidden=(16, 16), activation="tanh")
  variables = model.init(jax.random.key(0), jnp.zeros((1, D)))
  if ignore_from is not None:
    kernel = variables["params"]["Dense_0"]["kernel"]
    variables["params"]["Dense_0"]["kernel"] = kernel.at[ignore_from:].set(0.0)
  return model, variables


def _data():
  x = jax.random.normal(jax.random.key(1), (B, D))
  return x, jnp.array([0, 1, 2, 0])


def _completeness_error(fn, x, t, **options):
  a = attr.integrated_gradients(fn, x, t, **options)
  baseline = options.get("baseline", "zeros")
  b = jnp.zeros_like(x) if isinstance(baseline, str) else jnp.broadcast_to(baseline, x.shape)
  pick = lambda z: jnp.take_along_axis(fn(z), t[:, None], axis=1)[:, 0]
  return float(jnp.max(jnp.abs(a.sum(axis=1) - (pick(x) - pick(b)))))


@pytest.mark.parametrize("rule", ["trapezoid", "midpoint"])
def test_integrated_gradients_completeness_improves_with_steps(rule):
  model, v = _mlp()
  fn = lambda z: model.apply(v, z)
  x, t = _data()
  coarse = _completeness_error(fn, x, t, steps=8, rule=rule)
  fine = _completeness_error(fn, x, t, steps=256, rule=rule, chunk_size=40)  # ragged chunks
  assert fine < coarse
  assert fine < 1e-3
  baseline = 0.5 * jnp.ones((D,))
  assert _completeness_error(fn, x, t, steps=256, rule=rule, baseline=baseline) < 1e-3


def test_integrated_gradients_mean_baseline_and_jit():
  model, v = _mlp()
  x, t = _data()
  explain = lambda v, x, t: attr.integrated_gradients(lambda z: model.apply(v, z), x, t,
                                                      baseline="mean", steps=16, chunk_size=5)
  eager = explain(v, x, t)
  np.testing.assert_allclose(jax.jit(explain)(v, x, t), eager, rtol=1e-5, atol=1e-6)
  # Completeness against the mean baseline.
  fn = lambda z: model.apply(v, z)
  b = jnp.broadcast_to(x.mean(axis=0), x.shape)
  pick = lambda z: jnp.take_along_axis(fn(z), t[:, None], axis=1)[:, 0]
  np.testing.assert_allclose(eager.sum(axis=1), pick(x) - pick(b), atol=2e-2)


def test_saliency_equals_central_finite_differences():
  model, v = _mlp()
  fn = lambda z: model.apply(v, z)
  x, t = _data()
  eps = 1e-2
  pick = lambda z: jnp.take_along_axis(fn(z), t[:, None], axis=1)[:, 0]
  fd = jnp.stack([(pick(x + eps * e) - pick(x - eps * e)) / (2 * eps) for e in jnp.eye(D)],
                 axis=1)
  np.testing.assert_allclose(attr.saliency(fn, x, t), fd, atol=2e-3, rtol=1e-2)
  np.testing.assert_allclose(attr.gradient_x_input(fn, x, t), x * fd, atol=5e-3, rtol=1e-2)


def test_smoothgrad_without_noise_is_saliency_and_noise_changes_it():
  model, v = _mlp()
  fn = lambda z: model.apply(v, z)
  x, t = _data()
  s = attr.saliency(fn, x, t)
  assert_same_math(attr.smoothgrad(fn, x, t, noise=0.0, samples=7, chunk_size=3), s)
  noisy = attr.smoothgrad(fn, x, t, noise=0.3, samples=8, rng=jax.random.key(3))
  assert not np.allclose(noisy, s)
  np.testing.assert_array_equal(noisy, attr.smoothgrad(fn, x, t, noise=0.3, samples=8,
                                                       rng=jax.random.key(3)))


METHOD_OPTIONS = {
    "saliency": {},
    "gradient_x_input": {},
    "integrated_gradients": {"baseline": "mean", "steps": 8},
    "smoothgrad": {"noise": 0.2, "samples": 4},
    "occlusion": {"patch": 1},
}


def test_every_method_is_covered():
  assert sorted(METHOD_OPTIONS) == attr.METHODS.names()


@pytest.mark.parametrize("name", sorted(METHOD_OPTIONS))
def test_ignored_features_get_zero(name):
  """Zero up to float rounding: occlusion differences outputs computed in different batch
  shapes, whose matmuls may round differently (at the 1e-8 level here)."""
  model, v = _mlp(ignore_from=D // 2)
  x, t = _data()
  a = attr.attribute(name, lambda z: model.apply(v, z), x, t, **METHOD_OPTIONS[name])
  assert a.shape == x.shape
  np.testing.assert_allclose(a[:, D // 2:], 0.0, atol=1e-6)
  assert np.abs(a[:, :D // 2]).max() > 0


@pytest.mark.parametrize("name", sorted(METHOD_OPTIONS))
def test_ignored_image_half_gets_zero(name):
  # NHWC 4x4x2 images; the model only looks at the left two columns.
  w = jax.random.normal(jax.random.key(2), (4 * 2 * 2, C))
  fn = lambda z: jnp.tanh(z[:, :, :2, :].reshape(z.shape[0], -1) @ w)
  x = jax.random.normal(jax.random.key(4), (3, 4, 4, 2))
  options = dict(METHOD_OPTIONS[name], **({"patch": 2} if name == "occlusion" else {}))
  a = attr.attribute(name, fn, x, jnp.array([0, 1, 2]), **options)
  assert a.shape == x.shape
  np.testing.assert_allclose(a[:, :, 2:, :], 0.0, atol=1e-6)
  assert np.abs(a[:, :, :2, :]).max() > 0


def test_occlusion_of_linear_model_is_weight_times_input_minus_fill():
  w = jax.random.normal(jax.random.key(5), (D, C))
  fn = lambda z: z @ w + 1.0
  x, t = _data()
  a = attr.occlusion(fn, x, t, patch=1, fill=0.3, chunk_size=3)
  np.testing.assert_allclose(a, w[:, t].T * (x - 0.3), rtol=1e-5, atol=1e-5)
  # Images: a 1x1 patch occludes every channel of a pixel, so each channel gets the pixel's sum.
  wi = jax.random.normal(jax.random.key(6), (3, 3, 2, C))
  fni = lambda z: jnp.einsum("bhwc,hwck->bk", z, wi)
  xi = jax.random.normal(jax.random.key(7), (2, 3, 3, 2))
  ti = jnp.array([1, 2])
  ai = attr.occlusion(fni, xi, ti, patch=(1, 1))
  expected = jnp.einsum("bhwc,bhwc->bhw", jnp.moveaxis(wi[..., ti], -1, 0), xi)
  np.testing.assert_allclose(ai, jnp.broadcast_to(expected[..., None], xi.shape), rtol=1e-5,
                             atol=1e-5)


def test_occlusion_averages_overlapping_windows():
  fn = lambda z: jnp.stack([jnp.sum(jnp.sin(z) * jnp.arange(1.0, D + 1), axis=1)], axis=1)
  x, _ = _data()
  t = jnp.zeros((B,), jnp.int32)
  a = np.asarray(attr.occlusion(fn, x, t, patch=3, stride=2, fill=-1.0))
  # Brute force: windows start at 0, 2, 4 and a last one flush with the end at 5.
  xs, base = np.asarray(x), np.asarray(fn(x))[:, 0]
  total, count = np.zeros_like(xs), np.zeros(D)
  for s in (0, 2, 4, 5):
    occluded = xs.copy()
    occluded[:, s:s + 3] = -1.0
    total[:, s:s + 3] += (base - np.asarray(fn(jnp.asarray(occluded)))[:, 0])[:, None]
    count[s:s + 3] += 1
  np.testing.assert_allclose(a, total / count, rtol=1e-5, atol=1e-5)


def test_attribute_dispatch_and_errors():
  model, v = _mlp()
  fn = lambda z: model.apply(v, z)
  x, t = _data()
  np.testing.assert_array_equal(attr.attribute("saliency", fn, x, None),
                                attr.saliency(fn, x, jnp.argmax(fn(x), axis=-1)))
  with pytest.raises(ConfigError, match="did you mean 'saliency'"):
    attr.attribute("salency", fn, x, t)
  with pytest.raises(ConfigError, match="unknown option.*'step'.*known: baseline, steps"):
    attr.attribute("integrated_gradients", fn, x, t, step=3)
  with pytest.raises(ConfigError, match="rule"):
    attr.integrated_gradients(fn, x, t, rule="simpson")
  with pytest.raises(ConfigError, match="baseline"):
    attr.integrated_gradients(fn, x, t, baseline="blur")
  with pytest.raises(ConfigError, match="steps"):
    attr.integrated_gradients(fn, x, t, steps=0)
  with pytest.raises(ConfigError, match="targets"):
    attr.saliency(fn, x, t[:2])


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("shape", [(5, 8, 8, 3), (3, 6, 6, 1), (4, 64), (3, 10)])
def test_attribution_grid_is_a_png(tmp_path, shape):
  rng = np.random.default_rng(0)
  x, a = rng.normal(size=shape), rng.normal(size=shape)
  path = save_attribution_grid(tmp_path / "grid.png", x, a, labels=list(range(shape[0])),
                               ncols=4)
  data = open(path, "rb").read()
  assert data[:8] == PNG_MAGIC
  assert len(data) > 2000
  height, width, _ = matplotlib.image.imread(path).shape
  assert height > 200 and width > 200
