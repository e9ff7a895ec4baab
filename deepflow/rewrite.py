"""Re-running a traced function equation by equation, with some equations replaced.

Two exports need the same program computed another way: ONNX cannot express
``lax.platform_dependent`` (deepflow's CPU-only formulations: ``models.layers.materialize``, the
few-channel convolution of ``models.conv``), so ``portable_rule`` takes each one's portable
branch, the one every other platform runs; int8 quantization (``deepflow.quantize``) swaps the
matmuls and convolutions that read a weight for integer ones, and the ONNX export writes
constant-weight matmuls in the form ONNX Runtime's quantizer reads (``deepflow.export_onnx``).
Each is a ``rule(eqn, inputs)`` for ``evaluate``, which runs a jaxpr (traced with symbolic batch
dimensions, if any) on the caller's values, ``None`` from the rule meaning: bind the equation
unchanged. Nested ``jit`` calls are entered, so a rule sees every equation of the program but
those inside functions with custom derivatives, which an export enters too
(``inlining_custom_derivatives``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from jax.extend import core

Rule = Callable[[core.JaxprEqn, Sequence[Any]], "Sequence[Any] | None"]


class _PortableIndex:
  """What ``platform_index`` evaluates to under ``portable_rule``: the branch for no named platform."""


def evaluate(jaxpr: core.Jaxpr, consts: Sequence[Any], args: Sequence[Any], rule: Rule
             ) -> list[Any]:
  """``jaxpr`` on ``consts`` and ``args``, each equation through ``rule`` first."""
  env: dict[Any, Any] = {}
  read = lambda v: v.val if isinstance(v, core.Literal) else env[v]  # noqa: E731
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    inputs = [read(v) for v in eqn.invars]
    outputs = rule(eqn, inputs)
    if outputs is None:
      if eqn.primitive.name == "cond" and isinstance(inputs[0], _PortableIndex):
        branch = eqn.params["branches"][eqn.params["branches_platforms"].index(None)]
        outputs = evaluate(branch.jaxpr, branch.consts, inputs[1:], rule)
      elif eqn.primitive.name == "jit":  # entered, so the rule sees the equations inside
        closed = eqn.params["jaxpr"]
        outputs = evaluate(closed.jaxpr, closed.consts, inputs, rule)
      else:
        outputs = eqn.primitive.bind(*inputs, **eqn.primitive.get_bind_params(eqn.params))
        outputs = outputs if eqn.primitive.multiple_results else [outputs]
    env.update(zip(eqn.outvars, outputs))
  return [read(v) for v in jaxpr.outvars]


def portable_rule(eqn: core.JaxprEqn, inputs: Sequence[Any]) -> list[Any] | None:
  """``lax.platform_dependent`` runs its default branch (the formulation for platforms it does
  not name: ``evaluate`` takes it where a ``cond`` reads this rule's index); every other
  equation is unchanged."""
  del inputs
  return [_PortableIndex()] if eqn.primitive.name == "platform_index" else None


def chain(*rules: Rule) -> Rule:
  """The first of ``rules`` that rewrites an equation does."""
  def rule(eqn, inputs):
    return next((out for r in rules if (out := r(eqn, inputs)) is not None), None)
  return rule


def inlining_custom_derivatives(rule: Rule) -> Rule:
  """``rule``, also inside ``custom_jvp``/``custom_vjp`` calls (a ReLU, a pooling with its own
  gradient), whose bodies it inlines: for a program that is evaluated, never differentiated (an
  export), so that the rule sees their equations too."""
  def inlined(eqn, inputs):
    outputs = rule(eqn, inputs)
    if outputs is None and eqn.primitive.name in ("custom_jvp_call", "custom_vjp_call"):
      closed = eqn.params["call_jaxpr"]
      return evaluate(closed.jaxpr, closed.consts, inputs, inlined)
    return outputs
  return inlined


def source(eqn: core.JaxprEqn) -> str:
  """Where an equation was traced from: the flax layer's path (its name stack, when it has one)
  and file:line (function) of the innermost user frame."""
  from jax._src import source_info_util
  where = source_info_util.summarize(eqn.source_info)
  layer = str(eqn.source_info.name_stack)
  return f"layer {layer}, {where}" if layer else where
