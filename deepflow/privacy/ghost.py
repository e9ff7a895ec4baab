"""Per-example clipping in one forward and one backward pass, without per-example gradients of
the layers that ``ghost_layers`` covers (Dense and DenseGeneral, Conv, Embed, LayerNorm and
RMSNorm, deepflow's learned positions and class tokens): ghost clipping with book-keeping.

For a per-example loss over a Flax model, ``plan`` finds, at trace time, the covered layers'
calls (through ``nn.intercept_methods``) and which parameters they alone read; ``clipped_sum``
then runs the loss once per example (vmapped) with a zero offset added to every covered call's
output, takes one backward pass w.r.t. those offsets (each call's output gradient, per example)
and w.r.t. the remaining parameters (their per-example gradients, materialized as the vmapped
path does), and builds each example's gradient norm and the clipped sum from them. No second
backward pass is needed: the clipped sum of a covered layer comes straight from what it kept of
its inputs (``spec.capture``) and its output gradients, weighted by each example's clip factor.

A covered call claims the leaves its spec names under its module's path (a layer sharing its
parent's scope, as ViT's positions do, claims some of the parent's leaves). A leaf counts as
covered only when one layer claims it, all that layer's calls agree on the spec, and nothing but
covered calls reads it, which is checked on the loss's jaxpr: with every covered call replaced
by a constant, the loss must not depend on it.

A call inside a nested JAX transformation (``nn.scan``, so ``model.scan_layers``; ``nn.remat``,
so ``model.remat_policy``; ``nn.RNN``'s scan) is not covered, and its layer's parameters are
handled like any other uncovered ones. What book-keeping needs of such a call lives in the inner
trace. The output gradients could come out: an offset stacked on the layer axis, put into the
``params`` tree beside the layer's stacked parameters, reaches each scanned step as its slice,
and its gradient comes back stacked. The inputs cannot: a value leaves a scan's trace only as
one of its outputs, so either every scanned body returns what its covered calls kept (a
protocol between this module and each body: deepflow's ``block_stack``, Flax's ``nn.RNN``) or a
``custom_vjp`` smuggles them out as the "gradient" of a dummy parameter (a backward pass that is
not linear in its cotangent). Neither is done: the second also cannot tell, at trace time, a
layer whose parameters a scan broadcasts (``nn.RNN``'s cells, run once per time step: the
per-example gradient sums over steps, which the offsets would merge) from one under
``nn.remat`` (run once), and confusing them would give wrong norms.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core.tracers import current_trace
from jax.extend import core as jax_core

from deepflow.privacy import ghost_layers

PyTree = Any
Path = tuple[str, ...]


def _claims(path: Path, spec: Any) -> tuple[Path, ...]:
  """The parameter leaves a covered call at module ``path`` reads: ``params[path][name]`` for
  its spec's names (a layer sharing its parent's scope reads some of the parent's leaves)."""
  return tuple(path + (name,) for name in spec.param_names)


@dataclasses.dataclass(frozen=True)
class Call:
  """One call of a covered layer: its module's path, its spec and its output's per-example
  shape and dtype."""
  path: Path
  spec: Any
  out: jax.ShapeDtypeStruct

  @property
  def params(self) -> tuple[Path, ...]:
    return _claims(self.path, self.spec)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which calls are captured and which parameters get materialized per-example gradients."""
  calls: tuple[Call, ...]
  uncovered: tuple[Path, ...]  # parameter leaf paths outside every covered module

  @property
  def complete(self) -> bool:
    return not self.uncovered


def _intercepting(select: Callable[[Any, Path], bool], on_call: Callable):
  """An interceptor that hands ``on_call(next_fun, args, kwargs, path, spec)`` the calls of
  covered layers made in the trace where it was entered and that ``select(spec, path)`` keeps."""
  base = current_trace()

  def interceptor(next_fun, args, kwargs, context):
    spec = ghost_layers.layer_spec(context.module, context.method_name, kwargs)
    if spec is None or current_trace() != base:
      return next_fun(*args, **kwargs)
    path = tuple(context.module.scope.path)
    if not select(spec, path):
      return next_fun(*args, **kwargs)
    return on_call(next_fun, args, kwargs, path, spec)
  return interceptor


def _live_inputs(closed: jax_core.ClosedJaxpr) -> list[bool]:
  """Which inputs of a jaxpr its outputs depend on, conservatively: an equation that produces a
  live value (or has effects) reads all its inputs, nested jaxprs included."""
  jaxpr = closed.jaxpr
  live = {v for v in jaxpr.outvars if not isinstance(v, jax_core.Literal)}
  for eqn in reversed(jaxpr.eqns):
    if eqn.effects or any(v in live for v in eqn.outvars):
      live.update(v for v in eqn.invars if not isinstance(v, jax_core.Literal))
  return [v in live for v in jaxpr.invars]


def _leaf_paths(params: PyTree) -> list[Path]:
  """Every parameter's path of dict keys, in the order of ``jax.tree.leaves``."""
  return [tuple(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]


def plan(per_example_loss: Callable, params: PyTree, example: PyTree, key: jax.Array) -> Plan:
  """The covered calls of ``per_example_loss(params, example, key)`` (traced twice, abstractly)
  and the parameters left uncovered."""
  found: list[Call] = []
  # Only the calls of modules whose parameters are differentiated: a frozen module's (closed
  # over by the loss, absent from ``params``) runs as it is, its input gradient still flowing.
  leaves = _leaf_paths(params)
  owners = {leaf[:-1] for leaf in leaves}
  owned = lambda spec, path: path in owners  # noqa: E731

  def record(next_fun, args, kwargs, path, spec):
    out = next_fun(*args, **kwargs)
    found.append(Call(path, spec, jax.ShapeDtypeStruct(out.shape, out.dtype)))
    return out

  def traced(p):
    with nn.intercept_methods(_intercepting(owned, record)):
      return per_example_loss(p, example, key)[0]
  jax.eval_shape(traced, params)

  # The same loss with every covered call's output replaced by zeros, and the calls' inputs as
  # outputs too (what reaches a layer's input reaches the loss): any parameter these still
  # depend on is read by something other than its own layer's call.
  replaced, inputs = iter(found), []

  def constant(next_fun, args, kwargs, path, spec):
    call = next(replaced)
    assert call.path == path, "the model called its layers in a different order when retraced"
    inputs.extend(jax.tree.leaves((args, kwargs)))
    return jnp.zeros(call.out.shape, call.out.dtype)

  def without_covered(p):
    with nn.intercept_methods(_intercepting(owned, constant)):
      return per_example_loss(p, example, key)[0], inputs
  live = _live_inputs(jax.make_jaxpr(without_covered)(params))
  live_paths = {path for path, used in zip(leaves, live) if used}

  # A layer's leaves are covered when all its calls agree on the spec, nothing else reads them
  # and no other covered layer claims them.
  layers = _layers(found)
  claims = collections.Counter(leaf for claimed in layers for leaf in claimed)
  covered = set()
  for claimed, indices in layers.items():
    agree = all(found[i].spec == found[indices[0]].spec for i in indices)
    if (agree and set(claimed) <= set(leaves) and not set(claimed) & live_paths
        and all(claims[leaf] == 1 for leaf in claimed)):
      covered.update(claimed)
  calls = tuple(call for call in found if set(call.params) <= covered)
  uncovered = tuple(leaf for leaf in leaves if leaf not in covered)
  return Plan(calls, uncovered)


def _layers(calls: tuple[Call, ...] | list[Call]) -> dict[tuple[Path, ...], list[int]]:
  """The calls' indices grouped by the leaves they claim (one group per layer)."""
  groups: dict[tuple[Path, ...], list[int]] = {}
  for i, call in enumerate(calls):
    groups.setdefault(call.params, []).append(i)
  return groups


def clipped_sum(per_example_loss: Callable, params: PyTree, batch: PyTree, keys: jax.Array, *,
                clip_norm: float, the_plan: Plan) -> tuple[PyTree, dict[str, Any]]:
  """``clipped_gradient_sum``'s result (same ``aux``) by ghost clipping with book-keeping."""
  leaves = traverse_util.flatten_dict(params)
  covered_layers = _layers(the_plan.calls)
  uncovered = set(the_plan.uncovered)
  fixed = {k: v for k, v in leaves.items() if k not in uncovered}
  free = {k: v for k, v in leaves.items() if k in uncovered}
  offsets = [jnp.zeros(call.out.shape, call.out.dtype) for call in the_plan.calls]

  def example_loss(free_leaves, offsets, example, key):
    inputs, pending = [], iter(zip(the_plan.calls, offsets))

    def capture(next_fun, args, kwargs, path, spec):
      call, offset = next(pending)
      assert (call.path, call.spec) == (path, spec), \
          "the model called its layers in a different order when retraced"
      inputs.append(spec.capture(args, kwargs))
      return next_fun(*args, **kwargs) + offset

    merged = traverse_util.unflatten_dict({**fixed, **free_leaves})
    with nn.intercept_methods(_intercepting(
        lambda spec, path: _claims(path, spec) in covered_layers, capture)):
      loss, aux = per_example_loss(merged, example, key)
    return loss, (aux, inputs)

  def one_example(example, key):
    loss, pullback, (aux, inputs) = jax.vjp(
        lambda f, o: example_loss(f, o, example, key), free, offsets, has_aux=True)
    free_grads, out_grads = pullback(jnp.ones_like(loss))
    return loss, aux, inputs, free_grads, out_grads

  losses, example_aux, inputs, free_grads, out_grads = jax.vmap(one_example)(batch, keys)

  sq = sum((jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=1)
            for g in free_grads.values()), jnp.zeros(losses.shape, jnp.float32))
  for calls in covered_layers.values():
    sq = sq + ghost_layers.sq_norms(the_plan.calls[calls[0]].spec, [inputs[i] for i in calls],
                                    [out_grads[i] for i in calls])
  norms = jnp.sqrt(sq)
  # A zero gradient has norm 0: factor 1 (nothing to clip), not clip_norm / 0.
  factors = jnp.where(norms > clip_norm, clip_norm / norms, 1.0)

  summed = {k: jnp.tensordot(factors, g.astype(jnp.float32), axes=1).astype(g.dtype)
            for k, g in free_grads.items()}
  for claimed, calls in covered_layers.items():
    path, spec = the_plan.calls[calls[0]].path, the_plan.calls[calls[0]].spec
    sums = ghost_layers.clipped_sum(spec, [inputs[i] for i in calls],
                                    [out_grads[i] for i in calls], factors,
                                    {leaf[-1]: fixed[leaf] for leaf in claimed})
    summed.update({path + (name,): value for name, value in sums.items()})
  return traverse_util.unflatten_dict(summed), {
      "loss": losses, "aux": example_aux, "grad_norms": norms,
      "num_clipped": jnp.sum(norms > clip_norm)}
