"""The Fréchet distance the GAN task reports, against the textbook formula with scipy's matrix
square root."""
import numpy as np
import scipy.linalg

from deepflow.analysis.reference import frechet_distance


def textbook(mean1, cov1, mean2, cov2):
  root = scipy.linalg.sqrtm(cov1 @ cov2).real
  return float(np.sum((mean1 - mean2) ** 2) + np.trace(cov1 + cov2 - 2 * root))


def test_equals_the_formula_with_a_general_matrix_root():
  rng = np.random.default_rng(0)
  for dim in (1, 3, 16):
    a, b = rng.normal(size=(2, 4 * dim, dim))
    cov1, cov2 = np.cov(a, rowvar=False).reshape(dim, dim), np.cov(b * 2, rowvar=False).reshape(
        dim, dim)
    mean1, mean2 = rng.normal(size=(2, dim))
    np.testing.assert_allclose(frechet_distance(mean1, cov1, mean2, cov2),
                               textbook(mean1, cov1, mean2, cov2), rtol=1e-6)


def degenerate_error_bound(cov: np.ndarray) -> float:
  """How far from the exact distance float64 may land when ``cov`` is singular. A symmetric
  eigensolver returns each eigenvalue to within about n * eps * ||A||_2 (backward stability), so
  a zero eigenvalue of C^1/2 C C^1/2 (norm ||C||^2) comes back as up to n * eps * ||C||^2, and
  its square root, which enters the trace twice, as sqrt(n * eps) * ||C||: an error of order
  sqrt(eps) times the scale (1e-8 here), per null direction, whatever the CPU's kernels."""
  n, eps = len(cov), np.finfo(np.float64).eps
  nulls = int(np.sum(np.linalg.eigvalsh(cov) <= n * eps * np.linalg.norm(cov, 2)))
  return 2 * nulls * np.sqrt(n * eps) * np.linalg.norm(cov, 2)


def test_zero_for_the_same_gaussian_and_finite_when_degenerate():
  rng = np.random.default_rng(1)
  features = rng.normal(size=(50, 6))
  features[:, 2] = 0.0  # a dead unit: a singular covariance
  mean, cov = features.mean(0), np.cov(features, rowvar=False)
  bound = degenerate_error_bound(cov)
  assert 0 < bound < 1e-6  # one null direction of a unit-scale covariance
  assert abs(frechet_distance(mean, cov, mean, cov)) <= bound
  shifted = frechet_distance(mean + 1.0, cov, mean, cov)
  # only the means differ: ||1||^2 over 6, with the same rounding of the trace terms
  np.testing.assert_allclose(shifted, 6.0, rtol=0, atol=bound)
