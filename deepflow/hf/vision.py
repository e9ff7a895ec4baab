"""What the Hugging Face vision families (``vit``, ``resnet``) share: activation names, the
convolution kernel layouts, labels, and the one-line refusal of what deepflow does not build."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from deepflow.registry import ConfigError

# config.json's ``hidden_act`` -> deepflow's activation (PyTorch's "gelu" is the exact one).
ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
               "relu": "relu", "silu": "silu", "swish": "silu", "tanh": "tanh",
               "sigmoid": "sigmoid"}
# The classifier's variables: a run on another label set starts them fresh (deepflow.hf.finetune).
HEAD = r"^params/head/"
HF_ACTIVATIONS = {"gelu_exact": "gelu", "gelu": "gelu_new", "relu": "relu",
                  "silu": "silu", "tanh": "tanh", "sigmoid": "sigmoid"}


def unsupported(family: str, what: str, fix: str) -> ConfigError:
  """The one-line error for a config.json (or a model section, on export) deepflow cannot
  express: what it says, and what would work."""
  return ConfigError(f"Hugging Face {family}: {what} is not supported; {fix}")


def require(model: Mapping[str, Any], name: str) -> None:
  """Export asks each family in turn: one that does not write this model says so."""
  if model.get("name") != name:
    raise ConfigError(f"model {model.get('name')!r} is not a {name}")


def activation(family: str, hf_config: Mapping[str, Any]) -> str:
  name = hf_config.get("hidden_act", "gelu" if family == "vit" else "relu")
  if name not in ACTIVATIONS:
    raise unsupported(family, f"hidden_act {name!r}", f"known: {', '.join(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def hf_activation(family: str, name: str) -> str:
  if name not in HF_ACTIVATIONS:
    raise unsupported(family, f"activation {name!r} on export",
                      f"exportable: {', '.join(HF_ACTIVATIONS)}")
  return HF_ACTIVATIONS[name]


def square(family: str, hf_config: Mapping[str, Any], key: str) -> int:
  """An image or patch size: an int, or a [height, width] pair of equal sides."""
  value = hf_config[key]
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise unsupported(family, f"{key} {value!r}", "deepflow takes square sizes")
    value = value[0]
  return int(value)


def num_outputs(hf_config: Mapping[str, Any]) -> int:
  """The classifier's outputs: ``id2label``'s size (``num_labels`` when config.json has no
  label names)."""
  labels = hf_config.get("id2label")
  return len(labels) if labels else int(hf_config.get("num_labels", 2))


def labels(model: Mapping[str, Any]) -> dict[str, Any]:
  """config.json's label fields for a model section that carries ``num_outputs`` (and
  ``class_names``, optional, e.g. the dataset's)."""
  count = model.get("num_outputs")
  if not isinstance(count, int) or count < 1:
    raise ConfigError(f"Hugging Face export needs the model's num_outputs, got {count!r}")
  names = list(model.get("class_names") or (f"LABEL_{i}" for i in range(count)))
  if len(names) != count:
    raise ConfigError(f"{len(names)} class_names for {count} outputs")
  return {"id2label": {str(i): n for i, n in enumerate(names)},
          "label2id": {n: i for i, n in enumerate(names)}}


def conv_to_deepflow(w: np.ndarray) -> np.ndarray:
  """PyTorch's conv weight (out, in, h, w) -> flax's kernel (h, w, in, out)."""
  return np.transpose(w, (2, 3, 1, 0))


def conv_to_hf(k: np.ndarray) -> np.ndarray:
  return np.transpose(k, (3, 2, 0, 1))
