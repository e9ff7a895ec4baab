"""Hugging Face ``vit`` (``ViTForImageClassification``) <-> deepflow's ``vit`` model.

The reference: patches by a strided conv, a class token, learned positions, pre-LN blocks with
separate query/key/value projections (``split_qkv``), layer norms of epsilon 1e-12, the exact
(erf) GELU, and a linear classifier on the class token. Tensor names are those of the
checkpoints on the Hub (``vit.encoder.layer.N.attention.attention.query.weight``), which
``transformers`` still reads and writes. A ``ViTModel`` checkpoint (a backbone without a
classifier, e.g. ``google/vit-base-patch16-224-in21k``) is refused in one line.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import numpy as np

from deepflow.hf import vision
from deepflow.hf.rules import WeightRule, transpose
from deepflow.models import model_options
from deepflow.models.vit import ViT

MODEL_TYPES = ("vit",)
HEAD = vision.HEAD  # started fresh on another label set
ARCHITECTURE = "ViTForImageClassification"


def _check(hf_config: Mapping[str, Any]) -> None:
  archs = hf_config.get("architectures") or [ARCHITECTURE]
  if archs != [ARCHITECTURE]:
    raise vision.unsupported("vit", f"architectures {archs}", f"deepflow reads {ARCHITECTURE}")
  if hf_config.get("attention_probs_dropout_prob", 0.0):
    raise vision.unsupported("vit", "attention_probs_dropout_prob "
                             f"{hf_config['attention_probs_dropout_prob']}",
                             "deepflow's ViT has no attention dropout: set it to 0.0")
  heads, size = hf_config["num_attention_heads"], hf_config["hidden_size"]
  if hf_config.get("head_dim", size // heads) * heads != size:
    raise vision.unsupported("vit", f"head_dim {hf_config['head_dim']}",
                             "deepflow's heads split hidden_size")


def model_section(hf_config: dict) -> dict:
  _check(hf_config)
  return {
      "name": "vit",
      "num_outputs": vision.num_outputs(hf_config),
      "patch_size": vision.square("vit", hf_config, "patch_size"),
      "image_size": vision.square("vit", hf_config, "image_size"),
      "d_model": hf_config["hidden_size"],
      "num_heads": hf_config["num_attention_heads"],
      "num_layers": hf_config["num_hidden_layers"],
      "mlp_dim": hf_config["intermediate_size"],
      "pooling": "cls",
      "activation": vision.activation("vit", hf_config),
      "dropout": float(hf_config.get("hidden_dropout_prob", 0.0)),
      "norm_eps": float(hf_config.get("layer_norm_eps", 1e-12)),
      "qkv_bias": bool(hf_config.get("qkv_bias", True)),
      "split_qkv": True,
  }


def example_inputs(hf_config: dict) -> np.ndarray:
  """One NHWC image of the checkpoint's size, to initialise the model."""
  size = vision.square("vit", hf_config, "image_size")
  return np.zeros((1, size, size, int(hf_config.get("num_channels", 3))), np.float32)


def hf_config(model: Mapping) -> dict:
  """config.json of a ``vit`` model section (fields left out take their defaults);
  ``num_outputs`` and ``image_size`` must be set, ``num_channels`` (default 3) and
  ``class_names`` may be. Another model is a ConfigError."""
  vision.require(model, "vit")
  m = {**model_options(ViT), "num_channels": 3, **model}
  for key, want in (("split_qkv", True), ("pooling", "cls")):
    if m[key] != want:
      raise vision.unsupported("vit", f"{key}={m[key]!r} on export", f"it needs {want!r}")
  if not m["image_size"]:
    raise vision.unsupported("vit", "image_size 0 on export", "set model.image_size")
  return {
      "architectures": [ARCHITECTURE],
      "model_type": "vit",
      "hidden_size": m["d_model"],
      "num_hidden_layers": m["num_layers"],
      "num_attention_heads": m["num_heads"],
      "intermediate_size": m["mlp_dim"],
      "hidden_act": vision.hf_activation("vit", m["activation"]),
      "hidden_dropout_prob": m["dropout"],
      "attention_probs_dropout_prob": 0.0,
      "layer_norm_eps": m["norm_eps"],
      "image_size": m["image_size"],
      "patch_size": m["patch_size"],
      "num_channels": m["num_channels"],
      "qkv_bias": m["qkv_bias"],
      **vision.labels(m),
  }


def _heads_in(x: np.ndarray, heads: int) -> np.ndarray:
  """A projection into the heads: torch (out, in) or bias (out,) -> (in, heads, head_dim) or
  (heads, head_dim)."""
  return x.T.reshape(*x.shape[1:], heads, -1) if x.ndim == 2 else x.reshape(heads, -1)


def _heads_in_hf(x: np.ndarray) -> np.ndarray:
  return x.reshape(x.shape[0], -1).T if x.ndim == 3 else x.reshape(-1)


def _heads_out(x: np.ndarray, heads: int) -> np.ndarray:
  """The output projection: torch (out, in) -> (heads, head_dim, out)."""
  return x.T.reshape(heads, -1, x.shape[0])


def _heads_out_hf(x: np.ndarray) -> np.ndarray:
  return x.reshape(-1, x.shape[-1]).T


def _norm(hf: str, path: str) -> list[WeightRule]:
  return [WeightRule(f"{hf}.weight", f"{path}/scale"), WeightRule(f"{hf}.bias", f"{path}/bias")]


def _dense(hf: str, path: str) -> list[WeightRule]:
  return [WeightRule(f"{hf}.weight", f"{path}/kernel", transpose, transpose),
          WeightRule(f"{hf}.bias", f"{path}/bias")]


def _layer(i: int, heads: int, qkv_bias: bool) -> list[WeightRule]:
  hf, path = f"vit.encoder.layer.{i}", f"params/block{i}"
  into = functools.partial(_heads_in, heads=heads)
  rules = _norm(f"{hf}.layernorm_before", f"{path}/LayerNorm_0")
  for name in ("query", "key", "value"):
    parts = ("weight", "kernel"), ("bias", "bias")
    rules += [WeightRule(f"{hf}.attention.attention.{name}.{t}",
                         f"{path}/SelfAttention_0/{name}/{d}", into, _heads_in_hf)
              for t, d in parts[:2 if qkv_bias else 1]]
  rules += [WeightRule(f"{hf}.attention.output.dense.weight", f"{path}/SelfAttention_0/out/kernel",
                       functools.partial(_heads_out, heads=heads), _heads_out_hf),
            WeightRule(f"{hf}.attention.output.dense.bias", f"{path}/SelfAttention_0/out/bias")]
  rules += _norm(f"{hf}.layernorm_after", f"{path}/LayerNorm_1")
  rules += _dense(f"{hf}.intermediate.dense", f"{path}/MlpBlock_0/Dense_0")
  return rules + _dense(f"{hf}.output.dense", f"{path}/MlpBlock_0/Dense_1")


def weight_rules(hf_config: dict) -> list[WeightRule]:
  model_section(hf_config)  # refuses, in one line, what deepflow does not build
  heads, qkv_bias = hf_config["num_attention_heads"], bool(hf_config.get("qkv_bias", True))
  rules = [
      WeightRule("vit.embeddings.cls_token", "params/cls"),
      WeightRule("vit.embeddings.position_embeddings", "params/positions",
                 lambda x: x[0], lambda x: x[None]),
      WeightRule("vit.embeddings.patch_embeddings.projection.weight", "params/patches/kernel",
                 vision.conv_to_deepflow, vision.conv_to_hf),
      WeightRule("vit.embeddings.patch_embeddings.projection.bias", "params/patches/bias"),
  ]
  for i in range(hf_config["num_hidden_layers"]):
    rules += _layer(i, heads, qkv_bias)
  return (rules + _norm("vit.layernorm", "params/final_norm")
          + _dense("classifier", "params/head"))
