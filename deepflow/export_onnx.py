"""ONNX export: ``deepflow export --format onnx [--quantize int8] --out DIR`` writes
``DIR/model.onnx`` and ``DIR/signature.json``, which ``deepflow predict`` runs with ONNX Runtime and
numpy only (``deepflow.onnx_runtime``). Needs ``deepflow[edge]``.

The converted function is the one the StableHLO artifact serializes (``export.inference_function``:
the fitted eval-time preprocessing, then the model in eval mode), its weights as initializers and
its batch dimension symbolic. It is traced to a jaxpr of lax primitives first and converted from
that by jax2onnx, with ``lax.platform_dependent`` taking its portable branch
(``rewrite.portable_rule``): ONNX Runtime gets plain convolutions, not deepflow's CPU forms.
Per-example image steps (``host_preprocessing``) stay on the host, as for the StableHLO artifact.

Measured coverage (``tests/test_export_onnx.py``): mlp, cnn, resnet, vit, transformer_encoder and
transformer_lm convert and match; the rnn family does not (flax's RNN draws its initial carry with
``random_split``, which jax2onnx cannot convert): refused with one line naming the op and layer.

``--quantize int8`` is ONNX Runtime's dynamic quantization (``quantize_dynamic``): the weights of
MatMul in int8 per output channel, of Conv in int8 per tensor (its dynamic ConvInteger takes one
scale), symmetric; their input activations quantized at run time per tensor to uint8 with a zero
point (DynamicQuantizeLinear has no int8 form). Nothing needs calibration. ONNX Runtime's
ConvInteger is slow: the int8 digits CNN takes 10x the float model's time at batch 64
(``benchmarks/edge.py``); static QDQ quantization, measured against it, was level in time and
lost 2.4% perplexity on the text Transformer.
"""
from __future__ import annotations

import collections
import os
import re
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from deepflow import export, qat, rewrite
from deepflow.onnx_runtime import ONNX_FILE, RUNTIME
from deepflow.predict import sha256
from deepflow.registry import ConfigError, first_line
from deepflow.train.experiment import Experiment, RunSource

QUANTIZATIONS = ("int8",)
OPSET = 21  # ONNX Runtime 1.20+ runs it; the dynamic quantizer's per-channel form needs >= 13


def _require_edge():
  try:
    import jax2onnx
    import onnx  # noqa: F401
    return jax2onnx
  except ImportError as e:
    raise ConfigError(f"ONNX export needs {e.name}: pip install 'deepflow[edge]'") from e


def onnx_model(exp: Experiment, fn, weights: dict[str, np.ndarray],
               input_spec: jax.ShapeDtypeStruct) -> tuple[Any, jax.ShapeDtypeStruct]:
  """``(ModelProto, outputs)``: ``fn(weights, inputs)`` as ONNX, the weights constant, or a
  one-line ``ConfigError`` naming the op (and the layer that emits it) jax2onnx cannot convert."""
  jax2onnx = _require_edge()
  constants = {k: jnp.asarray(v) for k, v in weights.items()}
  # Traced here, outside jax2onnx's patches of flax layers: it converts lax primitives only.
  closed = jax.make_jaxpr(lambda x: fn(constants, x))(input_spec)
  rule = rewrite.chain(rewrite.portable_rule, matmul_rule, conv_rule)
  portable = lambda x: rewrite.evaluate(closed.jaxpr, closed.consts, [x], rule)[0]  # noqa: E731
  name = exp.config.model.name
  try:
    proto = jax2onnx.to_onnx(portable, [input_spec], model_name=f"deepflow_{name}",
                             opset=OPSET, input_names=[exp.pipeline.dataset.input_key],
                             output_names=["outputs"])
  except NotImplementedError as e:
    op = re.search(r"primitive '([^']+)'", str(e))
    where = _layer_of(closed.jaxpr, op.group(1)) if op else None
    raise ConfigError(
        f"model {name!r} cannot be exported to ONNX: jax2onnx has no conversion for "
        f"{repr(op.group(1)) if op else first_line(e)}"
        f"{f' (from {where})' if where else ''}; ONNX covers mlp, cnn, resnet, vit and "
        f"transformer models") from e
  return proto, jax.ShapeDtypeStruct(closed.out_avals[0].shape, closed.out_avals[0].dtype)


def matmul_rule(eqn: core.JaxprEqn, inputs: list[Any]) -> list[Any] | None:
  """A ``dot_general`` of activations with a constant weight (Dense, DenseGeneral, attention
  projections, tied embeddings) as ``x[..., K] @ W[K, N]``: jax2onnx writes it as an ONNX MatMul,
  which ONNX Runtime's quantizer turns into an integer matmul (it leaves Gemm and Einsum, jax2onnx's
  forms of a dot_general, in float)."""
  if eqn.primitive.name != "dot_general":
    return None
  x, w = inputs
  (x_contract, w_contract), (x_batch, _) = eqn.params["dimension_numbers"]
  if x_batch or isinstance(x, np.ndarray) or isinstance(w, jax.core.Tracer):
    return None
  x_free = [d for d in range(x.ndim) if d not in x_contract]
  w_free = [d for d in range(w.ndim) if d not in w_contract]
  k = int(np.prod([x.shape[d] for d in x_contract]))
  # On the host: the weight stays a constant (an initializer), which the quantizer requires.
  matrix = np.asarray(w).transpose(*w_contract, *w_free).reshape(k, -1)
  order = (*x_free, *x_contract)
  rows = (x if order == tuple(range(x.ndim)) else jnp.transpose(x, order)).reshape(
      *[x.shape[d] for d in x_free], k)
  out = jnp.matmul(rows, matrix, preferred_element_type=eqn.params["preferred_element_type"])
  return [out.reshape(*[x.shape[d] for d in x_free], *[w.shape[d] for d in w_free])]


def conv_rule(eqn: core.JaxprEqn, inputs: list[Any]) -> list[Any] | None:
  """A convolution with a constant kernel takes it in ONNX's (out, in, spatial...) layout,
  transposed on the host: the kernel stays an initializer, which the quantizer requires
  (jax2onnx would transpose it in the graph)."""
  if eqn.primitive.name != "conv_general_dilated" or isinstance(inputs[1], jax.core.Tracer):
    return None
  x, w = inputs
  numbers = eqn.params["dimension_numbers"]
  kernel = jnp.asarray(np.asarray(w).transpose(numbers.rhs_spec))
  numbers = numbers._replace(rhs_spec=tuple(range(w.ndim)))
  return [eqn.primitive.bind(x, kernel, **{**eqn.params, "dimension_numbers": numbers})]


def _layer_of(jaxpr, primitive: str) -> str | None:
  """The source line (file:line (function)) of the first equation binding ``primitive``."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == primitive:
      return rewrite.source(eqn)
    for sub in core.jaxprs_in_params(eqn.params):
      found = _layer_of(sub, primitive)
      if found:
        return found
  return None


def optimize(path: str) -> None:
  """ONNX Runtime's offline graph optimizations in place: the basic level a session applies at
  load (constant folding, e.g. the shapes of constants, and redundant nodes: 436 -> 268 nodes in
  the text Transformer), in standard ONNX ops, then shape inference, as its quantizer asks."""
  from onnxruntime.quantization.shape_inference import quant_pre_process
  quant_pre_process(path, path, skip_symbolic_shape=True)


def _drop_value_info(path: str) -> None:
  """The stored model without the inferred shapes of intermediate values (a runtime infers them
  again at load): 5% of a small model's file."""
  import onnx
  model = onnx.load(path)
  del model.graph.value_info[:]
  onnx.save(model, path)


def quantize_int8(model_path: str, out_path: str) -> dict[str, Any]:
  """Writes ``model_path``'s dynamic int8 form to ``out_path``; returns what was quantized."""
  import onnx
  from onnxruntime.quantization import QuantType, quantize_dynamic
  quantize_dynamic(model_path, out_path, per_channel=True, weight_type=QuantType.QInt8)
  ops = collections.Counter(n.op_type for n in onnx.load(out_path).graph.node)
  quantized = {op: ops[op] for op in ("MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul")
               if ops[op]}
  if not quantized:
    raise ConfigError("the model has no MatMul or Conv with constant weights that ONNX Runtime "
                      "can quantize to int8")
  return {"scheme": "int8", "tool": "onnxruntime.quantization.quantize_dynamic",
          "weights": "int8, symmetric: per output channel (MatMul), per tensor (Conv)",
          "activations": "uint8, per tensor, dynamic (computed at run time)",
          "quantized_ops": quantized}


def export_onnx(run: RunSource | str, out: str, *, quantize: str | None = None
                ) -> dict[str, Any]:
  """Writes the ONNX artifact of a checkpoint of ``run`` (a workdir or a ``RunSource``) to
  ``out`` (``model.onnx``,
  ``signature.json``); returns its signature. Nothing is written if the model cannot be
  converted."""
  if quantize not in (None, *QUANTIZATIONS):
    raise ConfigError(f"unknown quantization {quantize!r}; known: {', '.join(QUANTIZATIONS)}")
  source = RunSource.of(run)
  exp, state, step, which = source.open()
  quantize = qat.export_scheme(exp.config, quantize, QUANTIZATIONS)  # a QAT run: int8 by default
  fn, weights, example, input_spec = export.exportable(exp, state)
  proto, outputs = onnx_model(exp, fn, weights, input_spec)
  os.makedirs(out, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out) as tmp:
    path = os.path.join(tmp, ONNX_FILE)
    with open(path, "wb") as f:
      f.write(proto.SerializeToString())
    signature = export.signature_of(exp, input_spec, outputs, example, step, which,
                                    source.workdir)
    optimize(path)
    if quantize:
      signature["quantization"] = quantize_int8(path, path + ".int8")
      os.replace(path + ".int8", path)
    _drop_value_info(path)
    os.replace(path, os.path.join(out, ONNX_FILE))
  signature.update(runtime=RUNTIME, platforms=[RUNTIME], opset=OPSET,
                   call=f"onnxruntime.InferenceSession('{ONNX_FILE}').run(None, "
                        f"{{'{exp.pipeline.dataset.input_key}': inputs}})[0]",
                   files={ONNX_FILE: sha256(os.path.join(out, ONNX_FILE))})
  export.write_signature(out, signature)
  return signature
