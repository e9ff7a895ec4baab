"""Models for small devices. deepflow export --format onnx [--quantize int8]: ONNX Runtime
reproduces deepflow's own forward pass on raw inputs (the reference), the int8 model computes
exactly ONNX Runtime's documented integer arithmetic (a numpy reimplementation), predict runs
without JAX, and models jax2onnx cannot convert are refused with one line. deepflow eval
--quantize int8 (qwix): the quantized forward pass is qwix's int8 arithmetic, recomputed in numpy,
and its metrics are those of that numpy model."""
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx")
pytest.importorskip("qwix")
onnx = pytest.importorskip("onnx")

import deepflow  # noqa: E402
from deepflow import export, export_onnx, predict, quantize  # noqa: E402
from deepflow.data import sources  # noqa: E402
from deepflow.registry import ConfigError  # noqa: E402
from deepflow.train.experiment import Experiment  # noqa: E402
from tests.helpers import deepflow_cli, one_line_error, tiny_config  # noqa: E402
from tests.test_export import in_framework  # noqa: E402

RUNS = {
    "cnn": dict(model=dict(name="cnn", features=(8,), dense=(16,)),
                transforms=[dict(name="standardize")]),
    "resnet": dict(model=dict(name="resnet", stage_sizes=(1, 1), width=4)),
    "transformer_lm": dict(task="language_model", source="bundled:text",
                           model=dict(name="transformer_lm", d_model=16, num_heads=2,
                                      num_layers=1, mlp_dim=32, max_len=128)),
    # Integer arithmetic checked against numpy: one matmul layer after another, one conv.
    "mlp_raw": dict(model=dict(name="mlp", hidden=(16,))),
    "conv_raw": dict(model=dict(name="cnn", features=(4,), pooling="none", dense=())),
    "conv_pool_raw": dict(model=dict(name="cnn", features=(4,), dense=())),  # conv, ReLU, pool
    "lstm": dict(task="regression", source="bundled:sunspots", model=dict(name="rnn", cell="lstm", hidden_size=8)),
}


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """name -> workdir of a 3-step run, trained once per module."""
  done = {}

  def get(name):
    if name not in done:
      run = RUNS[name]
      config = tiny_config(
          model=run["model"], task__name=run.get("task", "classification"),
          data__source=run.get("source", "bundled:digits"), data__data_dir=data_dir,
          data__transforms=run.get("transforms", []), data__batch_size=16,
          data__eval_batch_size=32, train__steps=3, train__log_every=3)
      done[name] = str(tmp_path_factory.mktemp(name))
      deepflow.train_and_evaluate(config, done[name])
    return done[name]
  return get


# ONNX Runtime's own kernels for each layer, not jax2onnx's elementwise forms of XLA's.
KERNELS = {"cnn": {"Conv", "Relu", "MaxPool", "Gemm"}, "resnet": {"Conv", "Relu"},
           "transformer_lm": {"MatMul", "Softmax", "LayerNormalization"}}


@pytest.mark.parametrize("name", ["cnn", "resnet", "transformer_lm"])
def test_onnx_outputs_equal_deepflow(name, trained, tmp_path):
  """Float32 throughout: differences are summation order, a few ulps of the largest logit."""
  workdir = trained(name)
  signature = export_onnx.export_onnx(workdir, str(tmp_path))
  assert signature["runtime"] == "onnxruntime" and signature["input"]["shape"][0] is None
  ops = {n.op_type for n in onnx.load(os.path.join(str(tmp_path), "model.onnx")).graph.node}
  assert KERNELS[name] <= ops and not ops & {"Einsum", "ReduceMax", "Exp", "Max"}, ops
  inputs, expected = in_framework(workdir, 5)
  predictor = predict.load(str(tmp_path))
  for n in (1, 5):  # one symbolic batch dimension
    np.testing.assert_allclose(predictor(inputs[:n]), expected[:n], rtol=1e-5, atol=1e-5)


def _int8_weights(w, axis):
  """ONNX Runtime's symmetric int8 per output channel: scale = max|w| / 127 along ``axis``."""
  reduce = tuple(d for d in range(w.ndim) if d != axis)
  scale = np.abs(w).max(axis=reduce, keepdims=True) / 127
  return np.clip(np.rint(w / scale), -127, 127).astype(np.int32), scale.astype(np.float32)


def _uint8_activations(x):
  """DynamicQuantizeLinear: the range [min(x, 0), max(x, 0)] over the tensor onto 0..255."""
  lo, hi = np.float32(min(x.min(), 0)), np.float32(max(x.max(), 0))
  scale = np.float32((hi - lo) / 255)
  zero = np.clip(np.rint(-lo / scale), 0, 255)
  return np.clip(np.rint(x / scale) + zero, 0, 255).astype(np.int32) - int(zero), scale


def _dense(x, kernel, bias):
  qx, sx = _uint8_activations(x)
  qw, sw = _int8_weights(kernel, 1)
  return (qx @ qw).astype(np.float32) * (sx * sw) + bias


def test_dynamic_int8_is_onnx_runtimes_integer_arithmetic(trained, tmp_path):
  """A model without convolutions: int8 weights per channel, per-tensor uint8 activations with a
  zero point computed at run time, int32 accumulation, rescaled: recomputed in numpy from the
  checkpoint's float weights."""
  workdir = trained("mlp_raw")
  signature = export_onnx.export_onnx(workdir, str(tmp_path), quantize="int8")
  assert signature["quantization"]["quantized_ops"] == {"MatMulInteger": 2}
  inputs, floats = in_framework(workdir, 6)
  params = Experiment.from_workdir(workdir)[1].params
  h = np.maximum(_dense(inputs.astype(np.float32).reshape(6, -1), *_kb(params["Dense_0"])), 0)
  expected = _dense(h, *_kb(params["Dense_1"]))
  got = predict.load(str(tmp_path))(inputs)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  assert not np.allclose(got, floats, rtol=1e-5, atol=1e-5)  # really quantized


def test_dynamic_int8_stores_the_float_constants_it_leaves_in_int8(trained, tmp_path):
  """The Transformer's learned positions (an addition's input, which the quantizer leaves) and
  its attention mask are stored as int8 with one scale: max |w| / 127, the mask exactly."""
  workdir = trained("transformer_lm")
  signature = export_onnx.export_onnx(workdir, str(tmp_path), quantize="int8")
  model = onnx.load(os.path.join(str(tmp_path), export_onnx.ONNX_FILE))
  tensors = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
  assert all(t.dtype != np.float32 or t.size < export_onnx.INT8_CONSTANT_SIZE
             for t in tensors.values())
  stored = {name: tensors[f"{name}_int8"] * tensors[f"{name}_int8_scale"]
            for name in signature["quantization"]["int8_constants"]}
  table = np.asarray(Experiment.from_workdir(workdir)[1].params["positions"]["embedding"])
  positions = [v for v in stored.values() if v.shape[-2:] == table.shape]
  assert len(positions) == 1 and len(stored) == 2
  np.testing.assert_allclose(positions[0].reshape(table.shape), table,
                             atol=np.abs(table).max() / 254 * 1.0001)
  mask = [v for v in stored.values() if v.shape[-2:] != table.shape][0]
  np.testing.assert_array_equal(mask.reshape(mask.shape[-2:]), np.tril(np.ones(mask.shape[-2:])))
  inputs, floats = in_framework(workdir, 2)
  got = predict.load(str(tmp_path))(inputs)
  assert (got.argmax(-1) == floats.argmax(-1)).mean() > 0.9


def _uint8(x, scale, zero):
  """QuantizeLinear, and the requantization of an int32 accumulator: round half to even."""
  return np.clip(np.rint(x * scale) + zero, 0, 255).astype(np.int32)


def test_static_int8_of_a_conv_model_is_onnx_runtimes_integer_arithmetic(trained, tmp_path):
  """A model with convolutions is integer from input to output: QuantizeLinear with the
  calibration sample's range, QLinearConv (its bias in int32, the ReLU in its output range), max
  pool on uint8, QGemm, DequantizeLinear; recomputed in numpy from the stored int8 tensors and
  scales, bit for bit."""
  workdir = trained("conv_pool_raw")
  signature = export_onnx.export_onnx(workdir, str(tmp_path), quantize="int8")
  assert signature["quantization"]["quantized_ops"] == {"QLinearConv": 1, "QGemm": 1}
  model = onnx.load(os.path.join(str(tmp_path), export_onnx.ONNX_FILE))
  tensors = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
  node = {n.op_type: [tensors.get(i) for i in n.input] for n in model.graph.node}
  assert "ConvInteger" not in node and "DynamicQuantizeLinear" not in node
  _, xs, xz, wq, ws, wz, ys, yz, bias = node["QLinearConv"]
  exp = Experiment.from_workdir(workdir)[0]
  assert xs == np.float32(export_onnx.calibration_inputs(exp).max() / 255) and xz == wz == 0
  inputs, floats = in_framework(workdir, 6)
  qx = _uint8(inputs.astype(np.float32), 1 / xs, xz)  # (6, 8, 8, 1): NHWC
  windows = np.lib.stride_tricks.sliding_window_view(
      np.pad(qx - xz, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 3), axis=(1, 2))
  acc = np.einsum("nhwcij,ocij->nhwo", windows, wq.astype(np.int32)) + bias
  h = _uint8(acc.astype(np.float32), np.float32(xs * ws / ys), yz)
  h = h.reshape(6, 4, 2, 4, 2, 4).max(axis=(2, 4)).reshape(6, -1)  # 2x2 max pool, flattened
  _, hs, hz, kq, ks, kz, bias, os_, oz = node["QGemm"]
  acc = (h - hz) @ kq.astype(np.int32) + bias
  expected = (_uint8(acc.astype(np.float32), np.float32(hs * ks / os_), oz) - oz) * os_
  got = predict.load(str(tmp_path))(inputs)
  np.testing.assert_array_equal(got, expected.astype(np.float32))
  assert not np.allclose(got, floats, rtol=1e-5, atol=1e-5)  # really quantized


def _kb(layer):
  return np.asarray(layer["kernel"], np.float32), np.asarray(layer["bias"], np.float32)


PREDICT_WITHOUT_JAX = """
import runpy, sys
sys.argv = ["deepflow", "predict", "--model", sys.argv[1], "--input", sys.argv[2],
            "--output", sys.argv[3]]
try:
  runpy.run_module("deepflow", run_name="__main__")
except SystemExit as e:
  assert not e.code, e.code
print(sorted(m for m in ("jax", "jaxlib", "flax") if m in sys.modules))
"""


def test_onnx_predict_command_imports_no_jax(trained, tmp_path):
  workdir = trained("cnn")
  out, x, y = str(tmp_path / "onnx"), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")
  export_onnx.export_onnx(workdir, out, quantize="int8")
  inputs, expected = in_framework(workdir, 8)
  np.save(x, inputs)
  done = subprocess.run([sys.executable, "-c", PREDICT_WITHOUT_JAX, out, x, y],
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines()[-1] == "[]"
  # int8: logits within the activations' quantization error, same classes on nearly every one
  assert (np.load(y).argmax(-1) == expected.argmax(-1)).mean() >= 0.75
  np.testing.assert_allclose(np.load(y), expected, atol=0.2 * np.abs(expected).max())


def test_unsupported_model_is_refused_in_one_line_and_nothing_is_lost(trained, tmp_path):
  """ONNX: jax2onnx cannot convert flax's RNN; int8: the LSTM's matmuls are inside a scan."""
  workdir = trained("lstm")
  (tmp_path / "keep.txt").write_text("earlier export")
  exp, state, _, _ = Experiment.from_workdir(workdir)
  for refused, names in [
      (lambda: export_onnx.export_onnx(workdir, str(tmp_path)), ("'random_split'", "LSTMCell")),
      (lambda: export.export(workdir, str(tmp_path), quantize="int8"), ("layer RNN/RNN_0",)),
      (lambda: quantize.evaluate(exp, state, "test"), ("layer RNN/RNN_0",))]:
    with pytest.raises(ConfigError) as error:
      refused()
    assert "\n" not in str(error.value) and all(n in str(error.value) for n in names)
  assert sorted(os.listdir(tmp_path)) == ["keep.txt"]


def test_export_command(trained, tmp_path):
  workdir = trained("cnn")
  done = deepflow_cli("export", "--workdir", workdir, "--quantize", "int8", "--format",
                      "safetensors", "--out", str(tmp_path))
  assert "not safetensors" in one_line_error(done) and not os.listdir(tmp_path)
  done = deepflow_cli("export", "--workdir", workdir, "--format", "onnx", "--out", str(tmp_path))
  assert done.returncode == 0 and "model.onnx" in done.stdout, done.stderr
  # The converter's own logging and prints (optional plugins' tracebacks, debug lines) are kept
  # off the user's terminal: one line of output.
  assert len(done.stdout.splitlines()) == 1 and "Traceback" not in done.stderr, done
  inputs, expected = in_framework(workdir, 3)
  np.testing.assert_allclose(predict.load(str(tmp_path))(inputs), expected, rtol=1e-5,
                             atol=1e-5)


# ------------------------------------------------------------------------------------------------
# deepflow eval --quantize int8: qwix
# ------------------------------------------------------------------------------------------------

def _qwix_int8(x, axes, bits=8):
  """qwix's symmetric int8 (or int``bits``): scale = max|x| / 127.5 (2^(bits-1) - 0.5) over
  ``axes``, round half to even, clip to the type's range."""
  top = 2 ** (bits - 1)
  scale = np.abs(x).max(axis=axes, keepdims=True) / np.float32(top - 0.5)
  return np.clip(np.rint(x / scale), -top, top - 1).astype(np.int32), scale


def _qwix_dense(x, kernel, bias, bits=8):
  """Activations per row (int8), weights per output column (int``bits``)."""
  (qx, sx), (qw, sw) = _qwix_int8(x, (1,)), _qwix_int8(kernel, (0,), bits)
  return (qx @ qw).astype(np.float32) * sx * sw + bias


def _qwix_conv(x, kernel, bias, bits=8):
  """Activations per example, weights per output channel; SAME 3x3."""
  (qx, sx), (qw, sw) = _qwix_int8(x, (1, 2, 3)), _qwix_int8(kernel, (0, 1, 2), bits)
  padded = np.pad(qx, ((0, 0), (1, 1), (1, 1), (0, 0)))
  windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))
  acc = np.einsum("nhwcij,ijco->nhwo", windows, qw)
  return acc.astype(np.float32) * sx * sw.reshape(-1) + bias


def _qwix_reference(name, params, x, bits=8):
  if name == "mlp_raw":
    h = np.maximum(_qwix_dense(x.reshape(len(x), -1), *_kb(params["Dense_0"]), bits), 0)
    return _qwix_dense(h, *_kb(params["Dense_1"]), bits)
  h = np.maximum(_qwix_conv(x, *_kb(params["Conv_0"]), bits), 0)
  return _qwix_dense(h.reshape(len(x), -1), *_kb(params["Dense_0"]), bits)


def _positive_maxima(params):
  """Each kernel's output channels signed so that their largest magnitude is positive.

  qwix's scale is max|w| / 127.5, so that element quantizes to exactly +-127.5: +127.5 rounds to
  128 and saturates to 127 whatever the last bit of the division, -127.5 lands on -127 or -128
  by that bit (XLA:CPU's division and numpy's differ in it). Inputs (pixels) and hidden
  activations (after ReLU) are non-negative already."""
  def flip(layer):
    k = np.asarray(layer["kernel"], np.float32)
    flat = k.reshape(-1, k.shape[-1])
    sign = np.sign(flat[np.abs(flat).argmax(0), np.arange(k.shape[-1])])
    return {"kernel": k * sign, "bias": np.asarray(layer["bias"], np.float32)}
  return {name: flip(layer) for name, layer in params.items()}


@pytest.mark.parametrize("name", ["mlp_raw", "conv_raw"])
def test_qwix_int8_forward_is_its_integer_arithmetic(name, trained):
  import jax
  exp, state, _, _ = Experiment.from_workdir(trained(name))
  inputs, floats = in_framework(trained(name), 6)
  params = _positive_maxima(state.params)
  task = quantize.quantized_task(exp.task, "int8")
  got, _ = jax.jit(lambda p, s, x: task.apply(p, s, x, None, train=False))(
      params, state.model_state, inputs)
  expected = _qwix_reference(name, params, inputs.astype(np.float32))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  float_got, _ = exp.task.apply(params, state.model_state, inputs, None, train=False)
  assert not np.allclose(got, float_got, rtol=1e-5, atol=1e-5)  # really quantized
  plain, _ = exp.task.apply(state.params, state.model_state, inputs, None, train=False)
  np.testing.assert_array_equal(plain, floats)  # the run's own task is untouched


def test_eval_reports_int8_metrics_beside_float(trained):
  workdir = trained("mlp_raw")
  done = deepflow_cli("eval", "--workdir", workdir, "--quantize", "int8")
  assert done.returncode == 0, done.stderr
  float_line, int8_line = done.stdout.strip().splitlines()[-2:]
  assert float_line.startswith("final test metrics") and "final test int8 metrics" in int8_line
  inputs, floats = in_framework(workdir, 360)  # the whole test split
  exp, state, _, _ = Experiment.from_workdir(workdir)
  data = exp.pipeline.dataset
  labels = np.asarray(sources.take(data.split("test"), np.arange(360))[data.target_key])
  expected = _qwix_reference("mlp_raw", state.params, inputs.astype(np.float32))
  accuracy = float(int8_line.split("accuracy=")[1].split()[0])
  # Within two digits: a negative maximum's -127.5 rounds either way (see _positive_maxima),
  # which moves a logit by one quantization step and can flip a near-tie.
  assert accuracy == pytest.approx((expected.argmax(-1) == labels).mean(), abs=2 / 360)
  assert float(float_line.split("accuracy=")[1].split()[0]) == pytest.approx(
      (floats.argmax(-1) == labels).mean(), abs=1e-4)  # printed to 4 decimals


def test_int8_artifact_stores_int8_weights_and_runs_qwix_arithmetic(trained, tmp_path):
  """deepflow export --quantize int8 (StableHLO): kernels stored as int8 and per-channel scales,
  computing qwix's int8 model (numpy); deepflow predict runs it."""
  import jax
  workdir = trained("mlp_raw")
  exp, state, _, _ = Experiment.from_workdir(workdir)
  inputs, _ = in_framework(workdir, 6)
  fn, weights, _, spec = export.exportable(exp, state)
  params = _positive_maxima(state.params)
  weights.update({f"params/{layer}/{k}": v for layer, d in params.items() for k, v in d.items()})
  fn_int8, stored = quantize.quantized_function(fn, weights, spec)
  kernel = stored["params/Dense_0/kernel"]
  assert kernel.dtype == np.int8 and stored["params/Dense_0/kernel:scale"].shape == (1, 16)
  np.testing.assert_allclose(jax.jit(fn_int8)(stored, inputs),
                             _qwix_reference("mlp_raw", params, inputs.astype(np.float32)),
                             rtol=1e-5, atol=1e-5)
  signature = export.export(workdir, str(tmp_path), platforms=("cpu",), quantize="int8")
  assert signature["quantization"]["tool"] == "qwix"
  fn_int8, stored = quantize.quantized_function(*export.exportable(exp, state)[:2], spec)
  np.testing.assert_allclose(predict.load(str(tmp_path))(inputs),
                             jax.jit(fn_int8)(stored, inputs), rtol=1e-6, atol=1e-6)
