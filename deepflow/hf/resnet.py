"""Hugging Face ``resnet`` (``ResNetForImageClassification``, the layout of
``microsoft/resnet-50``) <-> deepflow's ``resnet`` model.

The reference: a 7x7 stride-2 stem and a 3x3 stride-2 max pool, stages of basic or bottleneck
blocks (stride in the bottleneck's 3x3, or its first 1x1 with ``downsample_in_bottleneck``),
PyTorch's padding (``window // 2`` on both sides: ``padding='symmetric'``), batch norm of
epsilon 1e-5 and momentum 0.1 (flax's default epsilon, and deepflow's momentum 0.9 is the same
average), global average pooling and a linear classifier. Stage ``i`` must output
``embedding_size * 2**i`` channels (times 4 for bottlenecks), as every published ResNet does.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from deepflow.hf import vision
from deepflow.hf.rules import WeightRule, transpose
from deepflow.models import model_options
from deepflow.models.resnet import ResNet

MODEL_TYPES = ("resnet",)
HEAD = vision.HEAD  # started fresh on another label set
ARCHITECTURE = "ResNetForImageClassification"
LAYER_TYPES = {"basic": 1, "bottleneck": 4}  # -> output channels per unit of block width
UNUSED = (r"\.num_batches_tracked$",)  # read by nothing: see fixed_tensors


def _check(hf_config: Mapping[str, Any]) -> None:
  archs = hf_config.get("architectures") or [ARCHITECTURE]
  if archs != [ARCHITECTURE]:
    raise vision.unsupported("resnet", f"architectures {archs}", f"deepflow reads {ARCHITECTURE}")
  kind = hf_config.get("layer_type", "bottleneck")
  if kind not in LAYER_TYPES:
    raise vision.unsupported("resnet", f"layer_type {kind!r}", "known: basic, bottleneck")
  width, sizes = hf_config["embedding_size"], list(hf_config["hidden_sizes"])
  expected = [LAYER_TYPES[kind] * width * 2**i for i in range(len(sizes))]
  if sizes != expected or len(sizes) != len(hf_config["depths"]):
    raise vision.unsupported("resnet", f"hidden_sizes {sizes} with embedding_size {width}",
                             f"deepflow's stages double: {expected}, one depth each")


def model_section(hf_config: dict) -> dict:
  _check(hf_config)
  return {
      "name": "resnet",
      "num_outputs": vision.num_outputs(hf_config),
      "stage_sizes": tuple(hf_config["depths"]),
      "width": hf_config["embedding_size"],
      "block": hf_config.get("layer_type", "bottleneck"),
      "stem": "imagenet",
      "pooling": "avg",
      "activation": vision.activation("resnet", hf_config),
      "padding": "symmetric",
      "downsample_in_first_stage": bool(hf_config.get("downsample_in_first_stage", False)),
      "downsample_in_bottleneck": bool(hf_config.get("downsample_in_bottleneck", False)),
  }


def example_inputs(hf_config: dict) -> np.ndarray:
  """One NHWC image, to initialise the model (a ResNet takes any size; 32 is enough)."""
  return np.zeros((1, 32, 32, int(hf_config.get("num_channels", 3))), np.float32)


def hf_config(model: Mapping) -> dict:
  """config.json of a ``resnet`` model section (fields left out take their defaults);
  ``num_outputs`` must be set, ``num_channels`` (default 3) and ``class_names`` may be.
  Another model is a ConfigError."""
  vision.require(model, "resnet")
  m = {**model_options(ResNet), "num_channels": 3, **model}
  for key, want in (("stem", "imagenet"), ("padding", "symmetric"), ("pooling", "avg")):
    if m[key] != want:
      raise vision.unsupported("resnet", f"{key}={m[key]!r} on export", f"it needs {want!r}")
  kind, depths = m["block"], list(m["stage_sizes"])
  return {
      "architectures": [ARCHITECTURE],
      "model_type": "resnet",
      "num_channels": m["num_channels"],
      "embedding_size": m["width"],
      "hidden_sizes": [LAYER_TYPES[kind] * m["width"] * 2**i for i in range(len(depths))],
      "depths": depths,
      "layer_type": kind,
      "hidden_act": vision.hf_activation("resnet", m["activation"]),
      "downsample_in_first_stage": m["downsample_in_first_stage"],
      "downsample_in_bottleneck": m["downsample_in_bottleneck"],
      **vision.labels(m),
  }


def _conv_norm(hf: str, conv: str, norm: str) -> list[WeightRule]:
  """A ``ResNetConvLayer`` or ``ResNetShortCut``: conv weight, batch norm affine and running
  statistics."""
  return [
      WeightRule(f"{hf}.convolution.weight", f"params/{conv}/kernel",
                 vision.conv_to_deepflow, vision.conv_to_hf),
      WeightRule(f"{hf}.normalization.weight", f"params/{norm}/scale"),
      WeightRule(f"{hf}.normalization.bias", f"params/{norm}/bias"),
      WeightRule(f"{hf}.normalization.running_mean", f"batch_stats/{norm}/mean"),
      WeightRule(f"{hf}.normalization.running_var", f"batch_stats/{norm}/var"),
  ]


def _blocks(hf_config: Mapping[str, Any]):
  """(stage, block, whether it has a projection shortcut) for every residual block."""
  channels = hf_config["embedding_size"]
  for s, (depth, out) in enumerate(zip(hf_config["depths"], hf_config["hidden_sizes"])):
    strided = s > 0 or hf_config.get("downsample_in_first_stage", False)
    for b in range(depth):
      yield s, b, b == 0 and (strided or channels != out)
    channels = out


def weight_rules(hf_config: dict) -> list[WeightRule]:
  model_section(hf_config)  # refuses, in one line, what deepflow does not build
  convs = 3 if hf_config.get("layer_type", "bottleneck") == "bottleneck" else 2
  rules = _conv_norm("resnet.embedder.embedder", "stem", "stem_norm")
  for s, b, shortcut in _blocks(hf_config):
    hf, path = f"resnet.encoder.stages.{s}.layers.{b}", f"stage{s}_block{b}"
    for j in range(convs):
      rules += _conv_norm(f"{hf}.layer.{j}", f"{path}/Conv_{j}", f"{path}/BatchNorm_{j}")
    if shortcut:
      rules += _conv_norm(f"{hf}.shortcut", f"{path}/shortcut", f"{path}/BatchNorm_{convs}")
  return rules + [WeightRule("classifier.1.weight", "params/head/kernel", transpose, transpose),
                  WeightRule("classifier.1.bias", "params/head/bias")]


def fixed_tensors(hf_config: dict) -> dict[str, np.ndarray]:
  """The checkpoint's tensors that hold no deepflow variable: every batch norm's
  ``num_batches_tracked`` (PyTorch counts its updates; it only matters for a momentum of None,
  which these models do not use). Loading skips them; export writes them as 0, as a freshly
  built PyTorch model has them."""
  return {r.hf_name.replace(".running_mean", ".num_batches_tracked"): np.zeros((), np.int64)
          for r in weight_rules(hf_config) if r.hf_name.endswith(".running_mean")}
