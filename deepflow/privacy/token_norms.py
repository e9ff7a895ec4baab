"""Per-example squared norms of an embedding table's gradient from the rows each example read
and their output gradients, without forming the per-example (V, C) gradient: ghost clipping's
norms for ``nn.Embed`` and learned positions (``ghost_layers``)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

# From this many T x C values an example, tokens' norms on CPU are summed by runs of equal ids
# rather than from the T x T Gram (benchmarks/token_norms.py: 2.4x faster at T 128, C 768; 4.3x
# at T 1,024, C 768; the Gram 1.2-2.4x faster at 512-8,192 values). The runs keep two more
# N x T x C buffers where the Gram keeps N x T x T. Other platforms keep the Gram (unmeasured
# there: sorts and scatters are slow on TPUs).
RUNS_MIN_SIZE = 16384


def _gram(ids: Array, g: Array) -> Array:
  same = (ids[:, :, None] == ids[:, None, :]).astype(g.dtype)
  return jnp.einsum("nts,nts->n", same, g @ jnp.swapaxes(g, 1, 2))


def _runs_one_example(ids: Array, g: Array) -> Array:
  """One example's norm (taken per example, so a batch-sharded input stays split): its positions
  sorted by id, each run of equal ids summed into a row of its own."""
  order = jnp.argsort(ids)
  ids, g = ids[order], g[order]
  run = jnp.cumsum(jnp.concatenate([jnp.ones((1,), bool), ids[1:] != ids[:-1]])) - 1
  sums = jax.ops.segment_sum(g, run, num_segments=ids.shape[0], indices_are_sorted=True)
  return jnp.sum(jnp.square(sums))


FORMS = {"gram": _gram, "runs": jax.vmap(_runs_one_example)}


def cpu_form(g: Array) -> str:
  """The default form on CPU for output gradients ``g`` (N, T, C); other platforms take the
  Gram."""
  return "runs" if g.shape[1] * g.shape[2] >= RUNS_MIN_SIZE else "gram"


def sq_norms(ids: Array, g: Array, form: str | None = None) -> Array:
  """(N,) squared norms of each example's table gradient, whose row ``u`` is the sum of the
  ``g_t`` (N, T, C) with ``ids_t == u`` (N, T). ``'gram'``: ``sum_{t,s} [ids_t == ids_s]
  <g_t, g_s>``, O(T^2 C). ``'runs'``: the sum over runs of equal ids of their summed ``g_t``
  squared, O(T C + T log T). By default the runs on CPU from ``RUNS_MIN_SIZE`` values of
  T x C an example, else the Gram."""
  if form is None:
    return lax.platform_dependent(ids, g, cpu=FORMS[cpu_form(g)], default=FORMS["gram"])
  if form not in FORMS:
    raise ValueError(f"unknown form {form!r}; known: {', '.join(FORMS)}")
  return FORMS[form](ids, g)
