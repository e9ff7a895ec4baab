"""ONNX export: ``deepflow export --format onnx [--quantize int8] --out DIR`` writes
``DIR/model.onnx`` and ``DIR/signature.json``, which ``deepflow predict`` runs with ONNX Runtime and
numpy only (``deepflow.onnx_runtime``). Needs ``deepflow[edge]``.

The converted function is the one the StableHLO artifact serializes (``export.inference_function``:
the fitted eval-time preprocessing, then the model in eval mode), its weights as initializers and
its batch dimension symbolic. It is traced to a jaxpr of lax primitives first and converted from
that by jax2onnx, with ``lax.platform_dependent`` taking its portable branch
(``rewrite.portable_rule``): ONNX Runtime gets plain convolutions, not deepflow's CPU forms.
Per-example image steps (``host_preprocessing``) stay on the host, as for the StableHLO artifact.
The graph is laid out for ONNX Runtime's kernels: attention and layer norms as its fused ops
(``_fused_layers``), matmuls with their weights as constants, ReLU and max pooling as Relu and
MaxPool (the rules below), then its offline optimizations (``optimize``).

Measured coverage (``tests/test_edge.py``): mlp, cnn, resnet, vit, transformer_encoder and
transformer_lm convert and match; the rnn family does not (flax's RNN draws its initial carry with
``random_split``, which jax2onnx cannot convert): refused with one line naming the op and layer.

``--quantize int8`` is ONNX Runtime's own quantization (``quantize_int8``): static, calibrated,
integer end to end for convolutional networks; dynamic (int8 weights per output channel, uint8
activations quantized at run time) for the others.
"""
from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import re
import tempfile
from typing import Any, Callable

import flax.linen
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
INTEGER_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "ConvInteger", "QLinearConv",
               "QLinearMatMul", "QGemm")
CALIBRATION_EXAMPLES, CALIBRATION_SEED = 256, 0
INT8_CONSTANT_SIZE = 1024  # elements: smaller float tensors (biases, norms' scales) stay float
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
  with _quiet_converter():
    return _convert(jax2onnx, exp, fn, weights, input_spec)


@contextlib.contextmanager
def _quiet_converter():
  """jax2onnx (0.12.5) logs a traceback for each optional plugin whose library is missing or
  moved (dm_pix), prints debug lines from its convolution conversion, and onnx_ir warns of the
  symbolic batch's untyped shape values: noise on a user's terminal, none of it about the model.
  Errors still raise."""
  loggers = [logging.getLogger(name) for name in ("jax2onnx", "onnx_ir")]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def _convert(jax2onnx, exp: Experiment, fn, weights: dict[str, np.ndarray],
             input_spec: jax.ShapeDtypeStruct) -> tuple[Any, jax.ShapeDtypeStruct]:
  constants = {k: jnp.asarray(v) for k, v in weights.items()}
  # Traced here, outside jax2onnx's patches of flax layers but those of _fused_layers: the rules
  # below see lax primitives.
  with _fused_layers():
    closed = jax.make_jaxpr(lambda x: fn(constants, x))(input_spec)
  rule = rewrite.inlining_custom_derivatives(rewrite.chain(
      rewrite.portable_rule, matmul_rule, conv_rule, relu_rule,
      max_pool_rule))
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


@contextlib.contextmanager
def _fused_layers():
  """``jax.nn.dot_product_attention`` and flax's ``LayerNorm`` traced as one equation each, which
  jax2onnx converts to ONNX Runtime's fused kernels (MatMul, Softmax, MatMul; LayerNormalization),
  using its own plugins' patches. Traced through, they are the lax primitives of their XLA
  formulation: batched products that jax2onnx writes as Einsums, a softmax of elementwise Exp and
  reductions, a layer norm of a dozen elementwise nodes: the float text Transformer took 3.1x as
  long at batch 1 in ONNX Runtime."""
  from jax2onnx.plugins._patching import apply_patches
  from jax2onnx.plugins.flax.linen.layer_norm import LayerNormPlugin
  from jax2onnx.plugins.jax.nn.dot_product_attention import DotProductAttentionPlugin
  plugins = (DotProductAttentionPlugin, LayerNormPlugin)
  for plugin in plugins:
    plugin.ensure_abstract_eval_bound()
  with apply_patches([spec for plugin in plugins for spec in plugin.binding_specs()]):
    yield


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


def relu_rule(eqn: core.JaxprEqn, inputs: list[Any]) -> list[Any] | None:
  """``max(x, 0)`` as an ONNX Relu (jax2onnx writes Max): ONNX Runtime fuses a Relu into the
  convolution or matmul before it, and its quantizer folds it into their integer forms."""
  if eqn.primitive.name != "max":
    return None
  zero = [i for i, v in enumerate(eqn.invars)
          if isinstance(v, core.Literal) and np.ndim(v.val) == 0 and v.val == 0]
  x = inputs[1 - zero[0]] if len(zero) == 1 else None
  if not isinstance(x, jax.core.Tracer) or not jnp.issubdtype(x.dtype, jnp.floating):
    return None
  return [jax.nn.relu(x)]


def max_pool_rule(eqn: core.JaxprEqn, inputs: list[Any]) -> list[Any] | None:
  """A call (``models.pooling``'s max pool, window == stride) whose body reshapes (B, H, W, ..., C)
  into blocks (B, H / k, k, W / l, l, ..., C) and takes the max over the window axes, as a
  max pool of its input: an ONNX MaxPool, in the convolutions' layout, so that ONNX Runtime
  removes the transposes around it and fuses each convolution with its bias and ReLU, in int8
  too (converted as it is, Reshape and ReduceMax: the float digits CNN took 1.4x as long)."""
  if eqn.primitive.name != "custom_vjp_call":
    return None
  body = eqn.params["call_jaxpr"].jaxpr
  if [e.primitive.name for e in body.eqns] != ["reshape", "reduce_max"] or len(inputs) != 1:
    return None
  x, (blocked, window_max) = inputs[0], body.eqns
  shape = blocked.params["new_sizes"]
  window = tuple(shape[2:-1:2])
  if (len(shape) != 2 * x.ndim - 2 or not _static(*shape[1:])
      or tuple(window_max.params["axes"]) != tuple(range(2, len(shape) - 1, 2))
      or tuple(x.shape[1:-1]) != tuple(n * k for n, k in zip(shape[1:-1:2], window))):
    return None
  return [flax.linen.max_pool(x, window_shape=window, strides=window)]  # jax2onnx: MaxPool


def _static(*dims) -> bool:
  return all(isinstance(d, (int, np.integer)) for d in dims)


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
  load (constant folding, e.g. the shapes of constants, transposes cancelled, a convolution's bias
  and ReLU fused into it: 173 -> 92 nodes in the text Transformer, 31 -> 14 in the digits CNN),
  in standard ONNX ops, then shape inference, as its quantizer asks."""
  from onnxruntime.quantization.shape_inference import quant_pre_process
  quant_pre_process(path, path, skip_symbolic_shape=True)


def _drop_value_info(path: str) -> None:
  """The stored model without the inferred shapes of intermediate values (a runtime infers them
  again at load): 5% of a small model's file."""
  import onnx
  model = onnx.load(path)
  del model.graph.value_info[:]
  onnx.save(model, path)


def calibration_inputs(exp: Experiment) -> np.ndarray:
  """``CALIBRATION_EXAMPLES`` training inputs as the artifact takes them, drawn with a fixed
  seed: the sample static quantization measures activation ranges on."""
  train = exp.pipeline.train_source
  rng = np.random.default_rng(CALIBRATION_SEED)
  indices = np.sort(rng.choice(len(train), min(CALIBRATION_EXAMPLES, len(train)), replace=False))
  examples = exp.pipeline.examples(train, indices, train=False, step=0)
  return np.asarray(examples[exp.pipeline.dataset.input_key])


class _Calibration:
  """ONNX Runtime's ``CalibrationDataReader`` protocol over ``inputs``, one example a call."""

  def __init__(self, name: str, inputs: np.ndarray):
    self._feeds = iter([{name: inputs[i:i + 1]} for i in range(len(inputs))])

  def get_next(self) -> dict[str, np.ndarray] | None:
    return next(self._feeds, None)


def quantize_int8(model_path: str, out_path: str, calibration: Callable[[], np.ndarray]
                  ) -> dict[str, Any]:
  """Writes ``model_path``'s int8 form to ``out_path``; returns what was quantized.

  A convolutional network (convolutions, no attention) is quantized statically (QOperator):
  activations' scales measured on the inputs ``calibration()`` returns, integer from the input's
  QuantizeLinear through QLinearConv, pooling and QGemm to the output's DequantizeLinear. ONNX
  Runtime's dynamic ConvInteger took 3x the float convolution's time at batch 1 and 6.5x at 64
  (``benchmarks/edge.py``). Other models are quantized dynamically (no calibration): quantized
  statically, the text Transformer's attention (its softmax, masks, activation products) ran
  1.65x slower and its perplexity rose from 4.7 to 34. Float tensors the quantizer leaves (a
  position table, an attention mask) are stored in int8 too (``_int8_constants``)."""
  import onnx
  from onnxruntime import quantization as q
  graph = onnx.load(model_path).graph
  ops = {n.op_type for n in graph.node}
  if "Conv" in ops and "Softmax" not in ops:
    sample = calibration()
    q.quantize_static(model_path, out_path, _Calibration(graph.input[0].name, sample),
                      quant_format=q.QuantFormat.QOperator, per_channel=False,
                      activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8)
    scheme = {"tool": "onnxruntime.quantization.quantize_static (QOperator)",
              "weights": "int8, symmetric, per tensor",
              "activations": f"uint8, per tensor, static: ranges of {len(sample)} "
                             f"training inputs (seed {CALIBRATION_SEED})"}
  else:
    q.quantize_dynamic(model_path, out_path, per_channel=True, weight_type=q.QuantType.QInt8)
    scheme = {"tool": "onnxruntime.quantization.quantize_dynamic",
              "weights": "int8, symmetric, per output channel",
              "activations": "uint8, per tensor, dynamic (computed at run time)"}
  model = onnx.load(out_path)
  ops = collections.Counter(n.op_type for n in model.graph.node)
  quantized = {op: ops[op] for op in INTEGER_OPS if ops[op]}
  if not quantized:
    raise ConfigError("the model has no MatMul or Conv with constant weights that ONNX Runtime "
                      "can quantize to int8")
  constants = _int8_constants(model)
  onnx.save(model, out_path)
  return {"scheme": "int8", **scheme, "quantized_ops": quantized,
          **({"int8_constants": constants} if constants else {})}


def _int8_constants(model) -> list[str]:
  """Each float initializer of at least ``INT8_CONSTANT_SIZE`` elements the quantizer left
  (inputs of additions, masks) stored as int8 with one symmetric scale, read through a
  DequantizeLinear (24K elements a run in the text Transformer, not measurable in its latency);
  returns their names."""
  import onnx
  from onnx import numpy_helper
  graph, names = model.graph, []
  for init in list(graph.initializer):
    if init.data_type != onnx.TensorProto.FLOAT or np.prod(init.dims) < INT8_CONSTANT_SIZE:
      continue
    values = numpy_helper.to_array(init)
    scale = np.float32(np.abs(values).max() / 127 or 1)
    graph.initializer.remove(init)
    graph.initializer.extend([
        numpy_helper.from_array(np.clip(np.rint(values / scale), -127, 127).astype(np.int8),
                                f"{init.name}_int8"),
        numpy_helper.from_array(scale, f"{init.name}_int8_scale")])
    graph.node.insert(0, onnx.helper.make_node(
        "DequantizeLinear", [f"{init.name}_int8", f"{init.name}_int8_scale"], [init.name]))
    names.append(init.name)
  return names


def export_onnx(run: RunSource | str, out: str, *, quantize: str | None = None
                ) -> dict[str, Any]:
  """Writes the ONNX artifact of a checkpoint of ``run`` (a workdir or a ``RunSource``) to
  ``out`` (``model.onnx``, ``signature.json``); returns its signature. Nothing is written if the
  model cannot be converted."""
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
      signature["quantization"] = quantize_int8(path, path + ".int8",
                                                lambda: calibration_inputs(exp))
      os.replace(path + ".int8", path)
    _drop_value_info(path)
    os.replace(path, os.path.join(out, ONNX_FILE))
  signature.update(runtime=RUNTIME, platforms=[RUNTIME], opset=OPSET,
                   call=f"onnxruntime.InferenceSession('{ONNX_FILE}').run(None, "
                        f"{{'{exp.pipeline.dataset.input_key}': inputs}})[0]",
                   files={ONNX_FILE: sha256(os.path.join(out, ONNX_FILE))})
  export.write_signature(out, signature)
  return signature
