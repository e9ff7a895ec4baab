"""Post-training int8 quantization of any deepflow model, computed by qwix (Google's JAX
quantization library): ``deepflow eval --quantize int8`` reports the quantized model's metrics
beside the float ones on the same split; ``deepflow export --quantize int8`` writes the
StableHLO artifact of that model, its weights stored in int8 (``int8_function``), which
``deepflow predict`` runs as any other.

``int8(fn)`` rewrites a function of the parameters (``rewrite.evaluate``): every ``dot_general``
and ``conv_general_dilated`` that reads a parameter as its weight (Dense, DenseGeneral, attention
projections, tied embeddings, convolutions) becomes qwix's integer op on qwix-quantized operands:
the weight symmetric int8 per output channel, the activation symmetric int8 with a scale per
row (per example and position; per example for a convolution) computed at run time, so nothing
needs calibration. Products of two activations (attention scores), embedding lookups,
normalizations and LoRA-merged kernels stay float. ``lax.platform_dependent`` takes its portable
branch, so deepflow's CPU form of a few-channel convolution is a convolution here too.

qwix rather than AQT (not measured against it): qwix's design follows AQT's (its README), it is
released against current JAX (AQT's latest release, aqtp 0.9.0, dates from August 2025), and its
``quantize``/``dot_general``/``conv_general_dilated`` take whole arrays, which an equation-level
rewrite needs; its own model interception (``quantize_model``) would miss deepflow's convolution,
which runs a CPU formulation behind ``lax.platform_dependent``.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from deepflow import rewrite
from deepflow.registry import ConfigError

SCHEMES = ("int8",)
DESCRIPTION = {"scheme": "int8", "tool": "qwix",
               "weights": "int8, symmetric, per output channel (stored as NAME and NAME:scale)",
               "activations": "int8, symmetric, per row (per example for a convolution), "
                              "scales computed at run time"}
# Equations that pass a weight through unchanged in value (a cast to its own dtype, a copy).
_PASS_THROUGH = ("convert_element_type", "copy", "copy_p")
# Loop bodies are traced as a whole; their matmuls are out of the rewrite's reach.
_LOOPS = ("scan", "while")


def _qwix():
  try:
    import qwix
    return qwix
  except ImportError as e:
    raise ConfigError("int8 quantization needs qwix: pip install 'deepflow[edge]'") from e


def _check(scheme: str) -> None:
  if scheme not in SCHEMES:
    raise ConfigError(f"unknown quantization {scheme!r}; known: {', '.join(SCHEMES)}")


def _free(ndim: int, taken) -> list[int]:
  return [d for d in range(ndim) if d not in taken]


def int8_rule(weights: dict[int, int], stored: dict[int, Any], seen: dict[int, Any]
              ) -> rewrite.Rule:
  """The rewrite of one traced function whose parameter values have the ids ``weights`` (id ->
  leaf index). A weight's quantized form is ``stored[index]`` if given (an artifact's int8
  weights), else computed here; ``seen[index]`` records the channel axes each weight was
  quantized along (``None`` if two uses disagree)."""
  qwix = _qwix()

  def weight(w, axes):
    index = weights[id(w)]
    seen[index] = axes if seen.get(index, axes) == axes else None
    if index in stored:
      return stored[index]
    return qwix.quantize(w, jnp.int8, channelwise_axes=axes)

  def rule(eqn, inputs):
    name = eqn.primitive.name
    if name in _LOOPS and any(id(x) in weights for x in inputs):
      raise ConfigError(f"int8 quantization cannot reach the weights a loop reads ({name} from "
                        f"{rewrite.source(eqn)}); quantize a model without recurrent or scanned "
                        f"layers")
    if name in _PASS_THROUGH and id(inputs[0]) in weights:
      out = eqn.primitive.bind(*inputs, **eqn.params)
      weights[id(out)] = weights[id(inputs[0])]
      return [out]
    if name == "dot_general" and id(inputs[1]) in weights:
      x, w = inputs
      numbers = eqn.params["dimension_numbers"]
      (x_contract, w_contract), (x_batch, _) = numbers
      if x_batch:
        return None
      wq = weight(w, tuple(_free(w.ndim, w_contract)))
      xq = qwix.quantize(x, jnp.int8, channelwise_axes=_free(x.ndim, x_contract))
      return [qwix.dot_general(xq, wq, numbers).astype(eqn.outvars[0].aval.dtype)]
    if name == "conv_general_dilated" and id(inputs[1]) in weights:
      x, w = inputs
      params = dict(eqn.params)
      numbers = params.pop("dimension_numbers")
      xq = qwix.quantize(x, jnp.int8, channelwise_axes=[numbers.lhs_spec[0]])
      wq = weight(w, (numbers.rhs_spec[0],))
      out = qwix.conv_general_dilated(
          xq, wq, params["window_strides"], params["padding"],
          lhs_dilation=params["lhs_dilation"], rhs_dilation=params["rhs_dilation"],
          dimension_numbers=numbers, feature_group_count=params["feature_group_count"],
          batch_group_count=params["batch_group_count"])
      return [out.astype(eqn.outvars[0].aval.dtype)]
    return rewrite.portable_rule(eqn, inputs)
  return rule


def int8(fn: Callable[..., Any], stored: dict[int, Any] | None = None,
         seen: dict[int, Any] | None = None) -> Callable[..., Any]:
  """``fn(params, *rest)`` (pytrees in and out) with the matmuls and convolutions that read a
  leaf of ``params`` computed in int8 by qwix (``int8_rule``; ``stored`` and ``seen`` are keyed
  by the leaf's index in ``jax.tree.leaves(params)``)."""
  def run(params, *rest):
    flat, tree = jax.tree.flatten((params, rest))

    def flat_fn(*leaves):
      p, r = jax.tree.unflatten(tree, leaves)
      return fn(p, *r)
    closed, shapes = jax.make_jaxpr(flat_fn, return_shape=True)(*flat)
    weights = {id(leaf): i for i, leaf in enumerate(flat[:len(jax.tree.leaves(params))])}
    rule = int8_rule(weights, stored or {}, {} if seen is None else seen)
    out = rewrite.evaluate(closed.jaxpr, closed.consts, flat, rule)
    return jax.tree.unflatten(jax.tree.structure(shapes), out)
  return run


def int8_function(fn: Callable[[dict, jax.Array], jax.Array], weights: dict[str, np.ndarray],
                  input_spec: jax.ShapeDtypeStruct, scheme: str = "int8"
                  ) -> tuple[Callable[[dict, jax.Array], jax.Array], dict[str, np.ndarray]]:
  """``(fn_int8, weights_int8)`` for an inference artifact (``export.inference_function``'s
  ``fn(weights, inputs)``): each weight a matmul or convolution reads is stored as its int8
  values and per-channel scales (``NAME`` int8, ``NAME:scale`` float32), quantized once here
  exactly as ``int8`` quantizes it at run time; ``fn_int8`` computes ``int8(fn)`` on them."""
  _check(scheme)
  qwix = _qwix()
  seen: dict[int, Any] = {}
  specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()}
  jax.eval_shape(int8(fn, seen=seen), specs, input_spec)
  names = sorted(specs)  # a dict's leaves, in jax.tree.leaves order
  axes = {names[i]: a for i, a in seen.items() if a is not None}
  if not axes:
    raise ConfigError("the model has no matmul or convolution reading a weight: nothing to "
                      "quantize to int8")
  stored = dict(weights)
  for name, channel_axes in axes.items():
    q = qwix.quantize(jnp.asarray(weights[name]), jnp.int8, channelwise_axes=channel_axes)
    stored[name], stored[f"{name}:scale"] = np.asarray(q.qvalue), np.asarray(q.scale)

  def fn_int8(weights_int8: dict[str, jax.Array], inputs: jax.Array) -> jax.Array:
    quantized = {name: qwix.QArray(weights_int8[name], weights_int8[f"{name}:scale"],
                                   qtype=jnp.int8) for name in axes}
    # What the model reads as its parameters; the rewrite uses the int8 values instead.
    floats = {n: quantized[n].qvalue * quantized[n].scale if n in quantized else weights_int8[n]
              for n in names}
    return int8(fn, stored={names.index(n): q for n, q in quantized.items()})(floats, inputs)
  return fn_int8, stored


def quantized_task(task: Any, scheme: str) -> Any:
  """A copy of ``task`` whose ``apply`` (the model's forward pass, in every step and metric that
  calls it) runs quantized; the task itself is unchanged."""
  _check(scheme)
  quantized = copy.copy(task)
  apply = task.apply
  quantized.apply = lambda params, model_state, inputs, rng, **kw: int8(
      lambda p, s, x: apply(p, s, x, rng, **kw))(params, model_state, inputs)
  return quantized


def evaluate(exp: Any, state: Any, split: str, scheme: str = "int8") -> dict[str, float]:
  """``exp.evaluate(state, split)`` with the model quantized: the same batches, padding rows and
  metrics, through the task's own eval step."""
  import dataclasses
  from deepflow.train import step as step_lib
  quantized = copy.copy(exp)
  quantized.task = quantized_task(exp.task, scheme)
  quantized.update = dataclasses.replace(exp.update, task=quantized.task)
  quantized._eval_step = jax.jit(step_lib.make_eval_step(quantized.update))
  return quantized.evaluate(state, split)
