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

Layers inside deepflow's scanned block stack (``model.scan_layers``: ``layers.block_stack``'s
``nn.scan``, parameters stacked on a leading layer axis) are covered too. Their calls are made in
the scan body's trace, out of which a value leaves only as one of the scan's outputs. A scanned
call's offset therefore enters as a parameter stacked beside its layer's (``ghost_offset_<i>``;
the scan hands each step its slice, and its gradient comes back stacked), and what the call
keeps leaves through ``deepflow.models.scan_taps``: the body returns it as its scanned outputs.
Norms and clipped sums are then taken layer by layer. Flax traces a scanned body more than once,
so a scanned call is known by its scan and its place in the body rather than by the order of
calls. Any other nested transformation keeps its layers uncovered, and their parameters are
handled like any other uncovered ones: ``nn.remat`` (``model.remat_policy``, also inside the
scanned stack), whose checkpointed block returns only its output (the same channel would serve
if it returned what its layers keep too; a scanned stack that is itself under an outer remat
still has its calls recorded, but the liveness check counts every input of the remat as read,
so those layers stay uncovered all the same), and ``nn.RNN``'s scan, whose cells share their
parameters across time steps (a per-example gradient summed over steps, which per-layer offsets
do not describe).
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

from deepflow.models import scan_taps
from deepflow.privacy import ghost_layers

PyTree = Any
Path = tuple[str, ...]
SCANNED_OFFSET = "ghost_offset_"  # a scanned call's offset, a parameter beside its layer's


def _claims(path: Path, spec: Any) -> tuple[Path, ...]:
  """The parameter leaves a covered call at module ``path`` reads: ``params[path][name]`` for
  its spec's names (a layer sharing its parent's scope reads some of the parent's leaves)."""
  return tuple(path + (name,) for name in spec.param_names)


@dataclasses.dataclass(frozen=True)
class Call:
  """One call of a covered layer: its module's path, its spec, its output's per-example shape
  and dtype (per layer when ``scanned``: inside ``layers.block_stack``'s scan, its parameters
  stacked on a leading layer axis)."""
  path: Path
  spec: Any
  out: jax.ShapeDtypeStruct
  scan: tuple[int, int] | None = None  # in a scanned body: (which scan, which call in it)

  @property
  def params(self) -> tuple[Path, ...]:
    return _claims(self.path, self.spec)

  @property
  def scanned(self) -> bool:
    return self.scan is not None


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which calls are captured and which parameters get materialized per-example gradients."""
  calls: tuple[Call, ...]
  uncovered: tuple[Path, ...]  # parameter leaf paths outside every covered module

  @property
  def complete(self) -> bool:
    return not self.uncovered


@dataclasses.dataclass(frozen=True)
class Site:
  """Where a covered call is made: its module, path and spec, and the scanned body it is in
  with its ``Call.scan`` (None: the trace the interceptor was entered in)."""
  module: nn.Module
  path: Path
  spec: Any
  body: scan_taps.Body | None
  scan: tuple[int, int] | None


def _intercepting(select: Callable[[Any, Path], bool], on_call: Callable):
  """An interceptor that hands ``on_call(next_fun, args, kwargs, site)`` the calls of covered
  layers that ``select(spec, path)`` keeps, made in the trace where it was entered or directly
  in a scanned body (``scan_taps``) under it."""
  base = current_trace()

  def interceptor(next_fun, args, kwargs, context):
    spec = ghost_layers.layer_spec(context.module, context.method_name, kwargs)
    if spec is None:
      return next_fun(*args, **kwargs)
    body = scan_taps.current_body()
    if current_trace() != base and body is None:
      return next_fun(*args, **kwargs)
    scan = None
    if body is not None:  # numbered before selecting: the same numbers in every pass
      scan, body.calls = (body.scan, body.calls), body.calls + 1
    path = tuple(context.module.scope.path)
    if not select(spec, path):
      return next_fun(*args, **kwargs)
    return on_call(next_fun, args, kwargs, Site(context.module, path, spec, body, scan))
  return interceptor


def _live_inputs(closed: jax_core.ClosedJaxpr, used: list[bool] | None = None) -> list[bool]:
  """Which inputs of a jaxpr its (``used``) outputs depend on, conservatively: an equation that
  produces a live value (or has effects) reads all its inputs, nested jaxprs included, except a
  scan, which reads what its body does (a scanned layer's parameters are scan inputs)."""
  jaxpr = closed.jaxpr
  outs = [v for v, u in zip(jaxpr.outvars, used or [True] * len(jaxpr.outvars)) if u]
  live = {v for v in outs if not isinstance(v, jax_core.Literal)}
  for eqn in reversed(jaxpr.eqns):
    out_used = [v in live for v in eqn.outvars]
    if eqn.primitive.name == "scan" and not eqn.effects:
      reads = _scan_reads(eqn, out_used)
    elif eqn.effects or any(out_used):
      reads = [True] * len(eqn.invars)
    else:
      continue
    live.update(v for v, r in zip(eqn.invars, reads) if r and not isinstance(v, jax_core.Literal))
  return [v in live for v in jaxpr.invars]


def _scan_reads(eqn: jax_core.JaxprEqn, used: list[bool]) -> list[bool]:
  """Which of a scan's inputs (consts, carry, scanned) its ``used`` outputs (carry, stacked)
  depend on: its body's, a carry counting as used once any step reads it."""
  body, consts, carry = eqn.params["jaxpr"], eqn.params["num_consts"], eqn.params["num_carry"]
  live_carry = used[:carry]
  while True:
    reads = _live_inputs(body, live_carry + used[carry:])
    more = [a or b for a, b in zip(live_carry, reads[consts:consts + carry])]
    if more == live_carry:
      return reads
    live_carry = more


def _leaf_paths(params: PyTree) -> list[Path]:
  """Every parameter's path of dict keys, in the order of ``jax.tree.leaves``."""
  return [tuple(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]


def plan(per_example_loss: Callable, params: PyTree, example: PyTree, key: jax.Array) -> Plan:
  """The covered calls of ``per_example_loss(params, example, key)`` (traced twice, abstractly)
  and the parameters left uncovered."""
  # Only the calls of layers whose parameters are differentiated: a frozen layer's (closed over
  # by the loss, absent from ``params``) runs as it is, its input gradient still flowing.
  leaves = _leaf_paths(params)
  trained = set(leaves)
  owned = lambda spec, path: set(_claims(path, spec)) <= trained  # noqa: E731
  outer: list[Call] = []
  scanned: dict[tuple[int, int], Call] = {}  # Flax traces a scanned body more than once

  def record(next_fun, args, kwargs, site):
    out = next_fun(*args, **kwargs)
    call = Call(site.path, site.spec, jax.ShapeDtypeStruct(out.shape, out.dtype), site.scan)
    if site.scan is None:
      outer.append(call)
    else:
      scanned[site.scan] = call
    return out

  def traced(p):
    with nn.intercept_methods(_intercepting(owned, record)), scan_taps.listening():
      return per_example_loss(p, example, key)[0]
  jax.eval_shape(traced, params)
  found = [*outer, *scanned.values()]

  # The same loss with every covered call's output replaced by zeros, and the calls' inputs as
  # outputs too (what reaches a layer's input reaches the loss): any parameter these still
  # depend on is read by something other than its own layer's call.
  replaced, inputs = iter(outer), []

  def constant(next_fun, args, kwargs, site):
    call = next(replaced) if site.scan is None else scanned[site.scan]
    assert call.path == site.path, "the model called its layers in a different order when retraced"
    values = jax.tree.leaves((args, kwargs))
    if site.body is None:
      inputs.extend(values)
    else:  # leaves the scan stacked, then joins the outputs
      site.body.kept[site.scan[1]] = values
    return jnp.zeros(call.out.shape, call.out.dtype)

  def without_covered(p):
    with nn.intercept_methods(_intercepting(owned, constant)), \
        scan_taps.listening(lambda stacked: inputs.extend(jax.tree.leaves(stacked))):
      return per_example_loss(p, example, key)[0], inputs
  live = _live_inputs(jax.make_jaxpr(without_covered)(params))
  live_paths = {path for path, used in zip(leaves, live) if used}

  # A layer's leaves are covered when all its calls agree on the spec, nothing else reads them
  # and no other covered layer claims them.
  layers = _layers(found)
  claims = collections.Counter(leaf for claimed in layers for leaf in claimed)
  covered = set()
  for claimed, indices in layers.items():
    first = found[indices[0]]
    agree = all((found[i].spec, found[i].scanned) == (first.spec, first.scanned) for i in indices)
    if (agree and not set(claimed) & live_paths
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


def _offset(call: Call, leaves: dict[Path, jax.Array]) -> jax.Array:
  """Zeros added to a call's output: per example, and for a scanned call per layer (its
  parameters' leading axis)."""
  layers = leaves[call.params[0]].shape[:1] if call.scanned else ()
  return jnp.zeros((*layers, *call.out.shape), call.out.dtype)


def _per_layer(fn: Callable, call: Call) -> Callable:
  """``fn(inputs, grads, *rest)`` of one layer, or of each scanned layer (inputs and gradients
  stacked on axis 1, after the examples; per-layer results stacked on axis 0)."""
  return jax.vmap(fn, in_axes=(1, 1, 0)) if call.scanned else fn


def clipped_sum(per_example_loss: Callable, params: PyTree, batch: PyTree, keys: jax.Array, *,
                clip_norm: float, the_plan: Plan) -> tuple[PyTree, dict[str, Any]]:
  """``clipped_gradient_sum``'s result (same ``aux``) by ghost clipping with book-keeping."""
  leaves = traverse_util.flatten_dict(params)
  covered_layers = _layers(the_plan.calls)
  uncovered = set(the_plan.uncovered)
  fixed = {k: v for k, v in leaves.items() if k not in uncovered}
  free = {k: v for k, v in leaves.items() if k in uncovered}
  offsets = [_offset(call, leaves) for call in the_plan.calls]
  # A scanned call's offset reaches it as a parameter beside its layer's, sliced by the scan.
  names = [call.path + (f"{SCANNED_OFFSET}{i}",) for i, call in enumerate(the_plan.calls)]

  in_scan = {call.scan: i for i, call in enumerate(the_plan.calls) if call.scanned}

  def example_loss(free_leaves, offsets, example, key):
    inputs, pending = {}, iter(i for i, call in enumerate(the_plan.calls) if not call.scanned)

    def capture(next_fun, args, kwargs, site):
      i = next(pending) if site.scan is None else in_scan[site.scan]
      call = the_plan.calls[i]
      assert (call.path, call.spec) == (site.path, site.spec), \
          "the model called its layers in a different order when retraced"
      kept = site.spec.capture(args, kwargs)
      if site.body is None:
        inputs[i], offset = kept, offsets[i]
      else:  # leaves the scan stacked on the layer axis
        site.body.kept[i] = kept
        offset = site.module.get_variable("params", names[i][-1])
      return next_fun(*args, **kwargs) + offset

    injected = {names[i]: offsets[i] for i, call in enumerate(the_plan.calls) if call.scanned}
    merged = traverse_util.unflatten_dict({**fixed, **free_leaves, **injected})
    with nn.intercept_methods(_intercepting(
        lambda spec, path: _claims(path, spec) in covered_layers, capture)), \
        scan_taps.listening(lambda stacked: inputs.update(stacked)):
      loss, aux = per_example_loss(merged, example, key)
    return loss, (aux, [inputs[i] for i in range(len(the_plan.calls))])

  def one_example(example, key):
    loss, pullback, (aux, inputs) = jax.vjp(
        lambda f, o: example_loss(f, o, example, key), free, offsets, has_aux=True)
    free_grads, out_grads = pullback(jnp.ones_like(loss))
    return loss, aux, inputs, free_grads, out_grads

  losses, example_aux, inputs, free_grads, out_grads = jax.vmap(one_example)(batch, keys)

  sq = sum((jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=1)
            for g in free_grads.values()), jnp.zeros(losses.shape, jnp.float32))
  for calls in covered_layers.values():
    call = the_plan.calls[calls[0]]
    layer_sq = _per_layer(lambda a, g, _: ghost_layers.sq_norms(call.spec, a, g), call)(
        [inputs[i] for i in calls], [out_grads[i] for i in calls], None)
    sq = sq + (jnp.sum(layer_sq, axis=0) if call.scanned else layer_sq)
  norms = jnp.sqrt(sq)
  # A zero gradient has norm 0: factor 1 (nothing to clip), not clip_norm / 0.
  factors = jnp.where(norms > clip_norm, clip_norm / norms, 1.0)

  summed = {k: jnp.tensordot(factors, g.astype(jnp.float32), axes=1).astype(g.dtype)
            for k, g in free_grads.items()}
  for claimed, calls in covered_layers.items():
    call = the_plan.calls[calls[0]]
    sums = _per_layer(lambda a, g, p: ghost_layers.clipped_sum(call.spec, a, g, factors, p),
                      call)([inputs[i] for i in calls], [out_grads[i] for i in calls],
                            {leaf[-1]: fixed[leaf] for leaf in claimed})
    summed.update({call.path + (name,): value for name, value in sums.items()})
  return traverse_util.unflatten_dict(summed), {
      "loss": losses, "aux": example_aux, "grad_norms": norms,
      "num_clipped": jnp.sum(norms > clip_norm)}
