"""Integer quantization of any deepflow model, computed by qwix (Google's JAX quantization
library), after training or during it. After: ``deepflow eval --quantize int8`` reports the
quantized model's metrics beside the float ones on the same split; ``deepflow export --quantize
int8`` writes the StableHLO artifact of that model, its weights stored as integers
(``quantized_function``), which ``deepflow predict`` runs as any other. During:
``model.quantization`` trains the same quantized model (``deepflow.qat``).

``quantized(fn, scheme)`` rewrites a function of the parameters (``rewrite.evaluate``): every
``dot_general`` and ``conv_general_dilated`` that reads a parameter as its weight (Dense,
DenseGeneral, attention projections, convolutions) becomes qwix's integer op on qwix-quantized
operands: the weight symmetric per output channel (``int8``, or ``int4``: values in [-8, 7]), the
activation symmetric int8 with a scale per row (per example and position; per example for a
convolution) computed at run time, so nothing needs calibration. Products of two activations
(attention scores), embedding lookups, a tied embedding's output projection (it reads the
transposed table), normalizations and LoRA-merged kernels stay float. ``lax.platform_dependent``
takes its portable branch, so deepflow's CPU form of a few-channel convolution is a convolution
here too; a block under ``jax.checkpoint`` (``nn.remat``) is entered and checkpointed again. With
``trainable`` each rewritten layer is differentiable: its forward pass is the same integer op (a
convolution's integer products summed in float32, exact below 2^24: ``_in_float``), its gradient
the float layer's at the dequantized operands (``straight_through``).

qwix rather than AQT (not measured against it): qwix's design follows AQT's (its README), it is
released against current JAX (AQT's latest release, aqtp 0.9.0, dates from August 2025), and its
``quantize``/``dot_general``/``conv_general_dilated`` take whole arrays, which an equation-level
rewrite needs; its own model interception (``quantize_model``) would miss deepflow's convolution,
which runs a CPU formulation behind ``lax.platform_dependent``.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from deepflow import rewrite
from deepflow.registry import ConfigError

# The weights' integer type per scheme; activations are int8 in both (all-integer matmuls).
SCHEMES = {"int8": jnp.int8, "int4": jnp.int4}
# Equations that pass a weight through unchanged in value (a cast to its own dtype, a copy).
_PASS_THROUGH = ("convert_element_type", "copy", "copy_p")
# Loop bodies are traced as a whole; their matmuls are out of the rewrite's reach.
_LOOPS = ("scan", "while")


def _qwix():
  try:
    import qwix
    return qwix
  except ImportError as e:
    raise ConfigError("quantization needs qwix: pip install 'deepflow[edge]'") from e


def check(scheme: str) -> None:
  """An unknown scheme is a one-line ConfigError."""
  if scheme not in SCHEMES:
    raise ConfigError(f"unknown quantization {scheme!r}; known: {', '.join(SCHEMES)}")


def description(scheme: str) -> dict[str, str]:
  """What ``signature.json`` says of an artifact quantized by ``scheme``."""
  packed = ", two values a byte in NAME:int4" if scheme == "int4" else " in NAME"
  return {"scheme": scheme, "tool": "qwix",
          "weights": f"{scheme}, symmetric, per output channel (values{packed}, scales in "
                     f"NAME:scale)",
          "activations": "int8, symmetric, per row (per example for a convolution), "
                         "scales computed at run time"}


def _free(ndim: int, taken) -> list[int]:
  return [d for d in range(ndim) if d not in taken]


def _widened(q: Any) -> Any:
  """An int4 QArray as the same integers in int8: XLA multiplies int8 by int8, not by int4."""
  if q.qvalue.dtype != jnp.int4:
    return q
  return _qwix().QArray(q.qvalue.astype(jnp.int8), q.scale, qtype=jnp.int8)


def _in_float(q: Any) -> Any:
  """A QArray whose integers are stored as floats of its scale's dtype, which qwix's convolution
  sums in that type (a float32 convolution) before rescaling as it rescales the int32 sums.
  The sums are the same as long as every partial sum of products stays below 2^24 in magnitude,
  float32's exact integers: always for windows of up to 1024 values (kernel height x width x
  input channels, |product| <= 128 * 128 = 2^14), and in practice far beyond."""
  return _qwix().QArray(q.qvalue.astype(q.scale.dtype), q.scale, qtype=q.qtype)


def straight_through(eqn: Any, quantize: Callable, compute: Callable) -> Callable:
  """``op(x, w)`` = ``compute(*quantize(x, w))`` (the integer layer), differentiated as the
  float layer ``eqn`` at the dequantized operands: the straight-through estimator, the rounding
  taken as the identity (the scales, functions of the operands, pass no gradient)."""
  qwix = _qwix()

  @jax.custom_vjp
  def op(x, w):
    return compute(*quantize(x, w))

  def forward(x, w):
    xq, wq = quantize(x, w)
    return compute(xq, wq), (qwix.dequantize(xq), qwix.dequantize(wq))

  def backward(dequantized, g):
    float_layer = lambda x, w: eqn.primitive.bind(x, w, **eqn.params)  # noqa: E731
    return jax.vjp(float_layer, *dequantized)[1](g)
  op.defvjp(forward, backward)
  return op


def quantized_rule(weights: dict[int, int], scheme: str, stored: dict[int, Any],
                   seen: dict[int, Any], trainable: bool = False) -> rewrite.Rule:
  """The rewrite of one traced function whose parameter values have the ids ``weights`` (id ->
  leaf index). A weight's quantized form is ``stored[index]`` if given (an artifact's integer
  weights), else computed here; ``seen[index]`` records the channel axes each weight was
  quantized along (``None`` if two uses disagree). ``trainable``: each layer differentiable by
  the straight-through estimator (``straight_through``), its forward pass unchanged."""
  qwix = _qwix()
  qtype = SCHEMES[scheme]

  def layer(eqn, x, w, x_axes, w_axes, integer):
    index = weights[id(w)]
    seen[index] = w_axes if seen.get(index, w_axes) == w_axes else None
    dtype = eqn.outvars[0].aval.dtype

    def quantize(x, w):
      xq = qwix.quantize(x, jnp.int8, channelwise_axes=x_axes)
      wq = stored[index] if index in stored else qwix.quantize(w, qtype,
                                                               channelwise_axes=w_axes)
      return xq, wq
    compute = lambda xq, wq: integer(xq, _widened(wq)).astype(dtype)  # noqa: E731
    if trainable:
      return straight_through(eqn, quantize, compute)(x, w)
    return compute(*quantize(x, w))

  def rematerialized(eqn, inputs):
    """A block under ``jax.checkpoint`` (``nn.remat``: a Transformer's ``remat_policy``)
    entered, so the rule reaches its weights, and checkpointed again with its own policy."""
    def block(*args):
      weights.update({id(a): weights[id(x)] for a, x in zip(args, inputs) if id(x) in weights})
      return rewrite.evaluate(eqn.params["jaxpr"], (), args, rule)
    return jax.checkpoint(block, prevent_cse=eqn.params["prevent_cse"],
                          policy=eqn.params["policy"])(*inputs)

  def rule(eqn, inputs):
    name = eqn.primitive.name
    if name in _LOOPS and any(id(x) in weights for x in inputs):
      raise ConfigError(f"{scheme} quantization cannot reach the weights a loop reads ({name} "
                        f"from {rewrite.source(eqn)}); quantize a model without recurrent or "
                        f"scanned layers")
    if name == "remat2" and any(id(x) in weights for x in inputs):
      return rematerialized(eqn, inputs)
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
      return [layer(eqn, x, w, _free(x.ndim, x_contract), tuple(_free(w.ndim, w_contract)),
                    lambda xq, wq: qwix.dot_general(xq, wq, numbers))]
    if name == "conv_general_dilated" and id(inputs[1]) in weights:
      x, w = inputs
      params = dict(eqn.params)
      numbers = params.pop("dimension_numbers")
      # Training: XLA:CPU's integer convolution made a train step 4-5x slower (digits CNN);
      # the same integers summed in float32 are exact (see ``_in_float``).
      operands = _in_float if trainable else lambda q: q  # noqa: E731
      conv = lambda xq, wq: qwix.conv_general_dilated(  # noqa: E731
          operands(xq), operands(wq), params["window_strides"], params["padding"],
          lhs_dilation=params["lhs_dilation"], rhs_dilation=params["rhs_dilation"],
          dimension_numbers=numbers, feature_group_count=params["feature_group_count"],
          batch_group_count=params["batch_group_count"])
      return [layer(eqn, x, w, [numbers.lhs_spec[0]], (numbers.rhs_spec[0],), conv)]
    return rewrite.portable_rule(eqn, inputs)
  return rule


def quantized(fn: Callable[..., Any], scheme: str = "int8", *,
              stored: dict[int, Any] | None = None, seen: dict[int, Any] | None = None,
              trainable: bool = False) -> Callable[..., Any]:
  """``fn(params, *rest)`` (pytrees in and out) with the matmuls and convolutions that read a
  leaf of ``params`` computed on integers by qwix (``quantized_rule``; ``stored`` and ``seen``
  are keyed by the leaf's index in ``jax.tree.leaves(params)``)."""
  check(scheme)

  def run(params, *rest):
    flat, tree = jax.tree.flatten((params, rest))

    def flat_fn(*leaves):
      p, r = jax.tree.unflatten(tree, leaves)
      return fn(p, *r)
    closed, shapes = jax.make_jaxpr(flat_fn, return_shape=True)(*flat)
    weights = {id(leaf): i for i, leaf in enumerate(flat[:len(jax.tree.leaves(params))])}
    rule = quantized_rule(weights, scheme, stored or {}, {} if seen is None else seen,
                          trainable)
    out = rewrite.evaluate(closed.jaxpr, closed.consts, flat, rule)
    return jax.tree.unflatten(jax.tree.structure(shapes), out)
  return run


def quantized_axes(fn: Callable[..., Any], scheme: str, *specs: Any) -> dict[int, Any]:
  """The leaves of ``fn``'s first argument that ``quantized(fn)`` quantizes (their index in
  ``jax.tree.leaves``), each with its channel axes, traced on ``specs``; a model with none is
  a one-line ConfigError."""
  seen: dict[int, Any] = {}
  jax.eval_shape(quantized(fn, scheme, seen=seen), *specs)
  axes = {i: a for i, a in seen.items() if a is not None}
  if not axes:
    raise ConfigError(f"the model has no matmul or convolution reading a weight: nothing to "
                      f"quantize to {scheme}")
  return axes


def quantized_function(fn: Callable[[dict, jax.Array], jax.Array], weights: dict[str, np.ndarray],
                       input_spec: jax.ShapeDtypeStruct, scheme: str = "int8"
                       ) -> tuple[Callable[[dict, jax.Array], jax.Array], dict[str, np.ndarray]]:
  """``(fn_q, weights_q)`` for an inference artifact (``export.inference_function``'s
  ``fn(weights, inputs)``): each weight a matmul or convolution reads is stored as its integer
  values and per-channel scales (``NAME`` int8 or ``NAME:int4`` two int4 values a byte,
  ``NAME:scale`` float32), quantized once here exactly as ``quantized`` quantizes it at run
  time; ``fn_q`` computes ``quantized(fn)`` on them."""
  check(scheme)
  qwix = _qwix()
  specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()}
  names = sorted(specs)  # a dict's leaves, in jax.tree.leaves order
  axes = {names[i]: a for i, a in quantized_axes(fn, scheme, specs, input_spec).items()}
  stored = dict(weights)
  for name, channel_axes in axes.items():
    q = qwix.quantize(jnp.asarray(weights[name]), SCHEMES[scheme], channelwise_axes=channel_axes)
    del stored[name]
    stored.update(_pack(name, np.asarray(q.qvalue)))
    stored[f"{name}:scale"] = np.asarray(q.scale)

  def fn_q(weights_q: dict[str, jax.Array], inputs: jax.Array) -> jax.Array:
    quantized_weights = {
        name: qwix.QArray(_unpack(name, weights_q, specs[name].shape),
                          weights_q[f"{name}:scale"], qtype=SCHEMES[scheme]) for name in axes}
    # What the model reads as its parameters; the rewrite uses the integer values instead.
    floats = {n: qwix.dequantize(quantized_weights[n]) if n in quantized_weights
              else weights_q[n] for n in names}
    return quantized(fn, scheme, stored={names.index(n): q for n, q in
                                         quantized_weights.items()})(floats, inputs)
  return fn_q, stored


def _pack(name: str, values: np.ndarray) -> dict[str, np.ndarray]:
  """An artifact's stored integer weight: int8 as it is (``NAME``); int4, which ``np.savez``
  cannot store, two values a byte (``NAME:int4``, uint8, the first value in the low bits)."""
  if values.dtype != jnp.int4:
    return {name: values}
  flat = np.append(values.astype(np.int8).ravel(), np.int8(0))[:2 * ((values.size + 1) // 2)]
  return {f"{name}:int4": ((flat[0::2] & 0xF) | (flat[1::2] << 4)).astype(np.uint8)}


def _unpack(name: str, weights: dict[str, jax.Array], shape: tuple[int, ...]) -> jax.Array:
  """``_pack``'s weight back, inside the artifact's function (shifts that sign-extend)."""
  if name in weights:
    return weights[name]
  packed = weights[f"{name}:int4"].astype(jnp.int8)
  low, high = (packed << 4) >> 4, packed >> 4
  size = int(np.prod(shape))
  return jnp.stack([low, high], -1).ravel()[:size].reshape(shape).astype(jnp.int4)


def quantized_task(task: Any, scheme: str, *, trainable: bool = False) -> Any:
  """A copy of ``task`` whose ``apply`` (the model's forward pass, in every step and metric that
  calls it) runs quantized (``quantized``; ``trainable``: differentiable by the straight-through
  estimator); the task itself is unchanged."""
  check(scheme)
  copied = copy.copy(task)
  apply = task.apply

  def quantized_apply(params, model_state, inputs, rng, *, extra=(), **kw):
    run = lambda p, s, x, r, e: apply(p, s, x, r, extra=e, **kw)  # noqa: E731
    return quantized(run, scheme, trainable=trainable)(params, model_state, inputs, rng, extra)
  copied.apply, copied.float_task = quantized_apply, task
  return copied


def float_task(task: Any) -> Any:
  """The task that ``quantized_task`` made ``task`` from (``task`` itself if none): the float
  model, which exports trace and then quantize themselves."""
  return getattr(task, "float_task", task)


def evaluate(exp: Any, state: Any, split: str, scheme: str = "int8") -> dict[str, float]:
  """``exp.evaluate(state, split)`` with the model quantized: the same batches, padding rows and
  metrics, through the task's own eval step."""
  from deepflow.train import step as step_lib
  copied = copy.copy(exp)
  copied.task = quantized_task(float_task(exp.task), scheme)
  copied.update = dataclasses.replace(exp.update, task=copied.task)
  copied._eval_step = jax.jit(step_lib.make_eval_step(copied.update))
  return copied.evaluate(state, split)
