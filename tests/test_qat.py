"""Quantization-aware training (model.quantization): its forward pass is the post-training
quantized model's (deepflow.quantize, qwix) and qwix's integer arithmetic recomputed in numpy;
its gradient is the float layer's at the dequantized operands (the straight-through estimator),
against a numpy formula and JAX's float convolution; a run trains, resumes bit-identically,
exports its integer model without --quantize (ONNX: ONNX Runtime's int8) and predict computes
what its evaluation did; int4 weights are integers in [-8, 7] stored two a byte (no ONNX form);
bad input is refused in one line."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("qwix")

import deepflow  # noqa: E402
from deepflow import export, export_onnx, predict, quantize  # noqa: E402
from deepflow.registry import ConfigError  # noqa: E402
from deepflow.train.experiment import Experiment  # noqa: E402
from tests.helpers import deepflow_cli, one_line_error, tiny_config  # noqa: E402
from tests.test_edge import _positive_maxima, _qwix_int8, _qwix_reference  # noqa: E402
from tests.test_export import in_framework  # noqa: E402
from tests.train.test_loop import final_params  # noqa: E402

MODELS = {"mlp_raw": dict(name="mlp", hidden=(16,)),
          "conv_raw": dict(name="cnn", features=(4,), pooling="none", dense=())}
SCHEMES = {8: "int8", 4: "int4"}


def _experiment(model, quantization="", *overrides, **settings):
  return Experiment(tiny_config(*overrides, model={**model, "quantization": quantization},
                                data__transforms=[], **settings), None)


def _inputs(exp, n):
  """``n`` test inputs, made non-negative: a row's largest magnitude is then positive, which
  qwix and numpy round alike (see ``_positive_maxima``)."""
  return np.abs(exp.pipeline.dataset.split("test")[np.arange(n)]["image"])


@pytest.mark.parametrize("name,bits", [("mlp_raw", 8), ("conv_raw", 8), ("mlp_raw", 4)])
def test_qat_forward_is_the_ptq_forward_and_its_integer_arithmetic(name, bits):
  """Exact: both are qwix's op on the same integers, rescaled by the same float32 scales in the
  same order. A matmul's products are summed in int32 in both; QAT sums a convolution's in
  float32, which is exact while every partial sum is below 2^24 (here at most 9 * 128 * 128 =
  147,456), so no tolerance applies. The numpy model rescales the same integers in its own
  order: 1e-5 covers float32 rounding of that."""
  trained = _experiment(MODELS[name], SCHEMES[bits])
  plain = _experiment(MODELS[name])
  params = _positive_maxima(jax.device_get(trained.init_state().params))
  x = _inputs(plain, 6)
  ptq, _ = quantize.quantized_task(plain.task, SCHEMES[bits]).apply(params, {}, x, None,
                                                                    train=False)
  for train in (False, True):
    qat, _ = trained.task.apply(params, {}, x, jax.random.PRNGKey(0), train=train)
    np.testing.assert_array_equal(qat, ptq)
  np.testing.assert_allclose(ptq, _qwix_reference(name, params, x, bits), rtol=1e-5, atol=1e-5)
  floats, _ = plain.task.apply(params, {}, x, None, train=False)
  assert not np.allclose(ptq, floats, rtol=1e-4, atol=1e-4)  # really quantized


def _dequantized(x, axes, bits=8):
  q, scale = _qwix_int8(x, axes, bits)
  return q.astype(np.float32) * scale


def test_ste_gradient_of_a_dense_layer_is_the_float_gradient_at_dequantized_operands():
  """One Dense layer y = x W + b through the QAT model: dL/dW = xq^T g, dL/dx = g Wq^T,
  dL/db = sum g, where xq, Wq are the dequantized int8 operands (numpy)."""
  exp = _experiment(dict(name="mlp", hidden=()), "int8")
  params = _positive_maxima(jax.device_get(exp.init_state().params))
  x = _inputs(exp, 5).reshape(5, -1)
  g = np.random.default_rng(0).normal(size=(5, 10)).astype(np.float32)

  def loss(p, x):
    return jnp.sum(exp.task.apply(p, {}, x, None, train=True)[0] * g)
  grads, dx = jax.grad(loss, argnums=(0, 1))(params, x)
  kernel = params["Dense_0"]["kernel"]
  xq, wq = _dequantized(x, (1,)), _dequantized(kernel, (0,))
  np.testing.assert_allclose(grads["Dense_0"]["kernel"], xq.T @ g, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, g @ wq.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grads["Dense_0"]["bias"], g.sum(0), rtol=1e-5, atol=1e-5)
  assert not np.allclose(grads["Dense_0"]["kernel"], x.T @ g, rtol=1e-4, atol=1e-4)
  assert not np.allclose(dx, g @ kernel.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_ste_gradient_of_a_convolution_is_the_float_gradient_at_dequantized_operands(bits):
  rng = np.random.default_rng(1)
  x = np.abs(rng.normal(size=(2, 6, 6, 3))).astype(np.float32)
  w = _positive_maxima({"c": {"kernel": rng.normal(size=(3, 3, 3, 4)), "bias": 0}})["c"]["kernel"]
  g = rng.normal(size=(2, 6, 6, 4)).astype(np.float32)
  conv = lambda w, x: jax.lax.conv_general_dilated(  # noqa: E731
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  quantized = quantize.quantized(conv, SCHEMES[bits], trainable=True)
  out, vjp = jax.vjp(quantized, w, x)
  xq, wq = _dequantized(x, (1, 2, 3)), _dequantized(w, (0, 1, 2), bits)
  expected_out, expected_vjp = jax.vjp(conv, wq, xq)  # the float layer at dequantized operands
  np.testing.assert_allclose(out, expected_out, rtol=1e-5, atol=1e-4)
  for got, expected in zip(vjp(g), expected_vjp(g)):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("policy", [None, jax.checkpoint_policies.dots_saveable])
def test_rematerialized_layers_are_quantized_like_plain_ones(policy):
  """``nn.remat`` (a Transformer's remat_policy) puts a block's matmuls inside one
  ``jax.checkpoint`` equation; the rewrite enters it: the weight is quantized, with the same
  output and STE gradients as without the checkpoint."""
  rng = np.random.default_rng(2)
  params = {"w": rng.normal(size=(6, 4)).astype(np.float32)}
  x = np.abs(rng.normal(size=(3, 6))).astype(np.float32)
  layer = lambda w, x: jnp.tanh(x @ w)  # noqa: E731
  plain = lambda p, x: layer(p["w"], x)  # noqa: E731
  remat = lambda p, x: jax.checkpoint(layer, policy=policy)(p["w"], x)  # noqa: E731
  assert quantize.quantized_axes(remat, "int8", params, x) == {0: (1,)}
  results = [jax.value_and_grad(lambda p, x: quantize.quantized(f, trainable=True)(p, x).sum(),
                                argnums=(0, 1))(params, x) for f in (plain, remat)]
  for got, expected in zip(jax.tree.leaves(results[1]), jax.tree.leaves(results[0])):
    np.testing.assert_array_equal(got, expected)
  assert not np.allclose(results[0][0], plain(params, x).sum(), rtol=1e-5)  # quantized


def test_a_qat_run_trains_resumes_exports_int8_and_predict_computes_its_eval(tmp_path):
  config = tiny_config("train.steps=12", "train.checkpoint_every=6",
                       "optimizer.schedule=cosine", model={**MODELS["conv_raw"],
                                                           "quantization": "int8"},
                       data__transforms=[])
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  deepflow.train_and_evaluate(config, a)
  losses = [r["loss"] for r in map(json.loads, open(os.path.join(a, "metrics.jsonl")))
            if r["split"] == "train"]
  assert losses[-1] < losses[0]
  shutil.copytree(a, b)
  shutil.rmtree(os.path.join(b, "checkpoints", "12"))  # as if killed after step 6's save
  deepflow.train_and_evaluate(config, b)
  for x, y in zip(jax.tree.leaves(final_params(config, a)[0]),
                  jax.tree.leaves(final_params(config, b)[0])):
    assert x.dtype == np.float32  # float master weights
    np.testing.assert_array_equal(x, y)

  art = str(tmp_path / "art")
  done = deepflow_cli("export", "--workdir", a, "--out", art, "--platforms", "cpu")
  assert done.returncode == 0 and done.stdout.rstrip().endswith("; int8"), done.stderr
  with np.load(os.path.join(art, export.WEIGHTS_FILE)) as weights:
    assert weights["params/Conv_0/kernel"].dtype == np.int8
  inputs, qat_eval = in_framework(a, 7)  # the run's own task: its QAT forward in eval mode
  np.save(tmp_path / "x.npy", inputs)
  done = deepflow_cli("predict", "--model", art, "--input", str(tmp_path / "x.npy"), "--output",
                      str(tmp_path / "y.npy"))
  assert done.returncode == 0, done.stderr
  np.testing.assert_allclose(np.load(tmp_path / "y.npy"), qat_eval, rtol=1e-6, atol=1e-6)

  with pytest.raises(ConfigError, match=r"^the run was trained for int8 \(model.quantization\); "
                                        r"--quantize int4 contradicts it$"):
    export.export(a, str(tmp_path / "int4"), quantize="int4")
  assert not os.path.exists(tmp_path / "int4")
  # ONNX Runtime's own int8: static (integer end to end) for a convolutional network.
  signature = export_onnx.export_onnx(a, str(tmp_path / "onnx"))
  assert signature["quantization"]["quantized_ops"] == {"QLinearConv": 1, "QGemm": 1}


def test_int4_artifact_stores_weights_in_minus8_to_7_two_a_byte(tmp_path):
  workdir = str(tmp_path / "run")
  deepflow.train_and_evaluate(tiny_config(model={**MODELS["mlp_raw"], "quantization": "int4"},
                                          data__transforms=[]), workdir)
  exp, state, _, _ = Experiment.from_workdir(workdir)
  fn, weights, _, spec = export.exportable(exp, state)
  params = _positive_maxima(state.params)
  weights.update({f"params/{layer}/{k}": v for layer, d in params.items() for k, v in d.items()})
  fn_q, stored = quantize.quantized_function(fn, weights, spec, "int4")
  kernel = np.asarray(params["Dense_0"]["kernel"])
  packed = stored["params/Dense_0/kernel:int4"]
  assert packed.dtype == np.uint8 and packed.size == (kernel.size + 1) // 2
  assert "params/Dense_0/kernel" not in stored
  values = np.asarray(quantize._unpack("params/Dense_0/kernel", stored, kernel.shape), np.int32)
  assert values.min() >= -8 and values.max() == 7
  every = np.arange(-8, 7).reshape(3, 5).astype(jnp.int4)  # every value, an odd count
  np.testing.assert_array_equal(quantize._unpack("w", quantize._pack("w", every), (3, 5)), every)
  np.testing.assert_array_equal(values, _qwix_int8(kernel, (0,), 4)[0])
  x = _inputs(exp, 6)
  np.testing.assert_allclose(jax.jit(fn_q)(stored, x), _qwix_reference("mlp_raw", params, x, 4),
                             rtol=1e-5, atol=1e-5)
  signature = export.export(workdir, str(tmp_path / "art"), platforms=("cpu",))
  assert signature["quantization"]["scheme"] == "int4"
  with pytest.raises(ConfigError, match=r"^this format writes int8 models, not int4 \(the run"):
    export_onnx.export_onnx(workdir, str(tmp_path / "onnx"))
  assert signature["quantization"]["training"].startswith("quantization-aware")
  fn_q, stored = quantize.quantized_function(*export.exportable(exp, state)[:2], spec, "int4")
  np.testing.assert_allclose(predict.load(str(tmp_path / "art"))(x),
                             jax.jit(fn_q)(stored, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model,quantization,overrides,says", [
    (MODELS["mlp_raw"], "int3", (), "model.quantization must be one of int8, int4"),
    (MODELS["mlp_raw"], "int8", ("model.lora.rank=2",), "does not combine with model.lora"),
    (dict(name="transformer_encoder", d_model=8, num_heads=2, num_layers=2, mlp_dim=16,
          scan_layers=True), "int8", (),
     "cannot reach the weights a loop reads (scan from layer TransformerEncoder, "),
])
def test_bad_input_is_one_line(model, quantization, overrides, says):
  with pytest.raises(ConfigError) as error:
    _experiment(model, quantization, *overrides)
  assert "\n" not in str(error.value) and says in str(error.value), str(error.value)
