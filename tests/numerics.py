"""Tolerances that follow from the computation rather than from one machine's rounding.

Two programs that compute the same float32 math in another order (a gradient with some
parameters frozen or not differentiated, a fused or unfused step, another CPU's kernels) agree
to within a number of roundings of each tensor's *scale*, not of each entry: an entry that is
a sum of terms cancelling to near zero keeps its terms' rounding error, so a fixed absolute
tolerance below the dtype's epsilon (1e-7, 1e-8 in float32) passes or fails by the kernels'
summation order. Here the relative tolerance is ``roundings`` epsilons of the less precise
dtype, and the absolute one as many epsilons of the reference's largest magnitude.
"""
import numpy as np

ROUNDINGS = 64  # accumulated roundings allowed: reductions of tens of terms, a few ops deep


def tolerances(actual, expected, roundings: int = ROUNDINGS) -> dict[str, float]:
  """``rtol`` and ``atol`` for comparing ``actual`` with ``expected`` (arrays or scalars)."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  eps = max(np.finfo(x.dtype).eps if np.issubdtype(x.dtype, np.inexact) else 0.0
            for x in (actual, expected)) or np.finfo(np.float64).eps
  scale = float(np.max(np.abs(expected))) if expected.size else 0.0
  return {"rtol": roundings * eps, "atol": roundings * eps * scale}


def assert_same_math(actual, expected, roundings: int = ROUNDINGS, **kwargs) -> None:
  """``actual`` equals ``expected`` up to the rounding of a differently ordered computation."""
  np.testing.assert_allclose(actual, expected, **tolerances(actual, expected, roundings), **kwargs)
