"""How one Hugging Face tensor maps to one deepflow variable, both ways.

A family module (``deepflow/hf/<family>.py``) lists a ``WeightRule`` per tensor of a checkpoint;
loading applies ``to_deepflow`` to each tensor as it is read, export applies ``to_hf`` to each
variable as it is written, so the two directions are written once, side by side.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
  return x


def transpose(x: np.ndarray) -> np.ndarray:
  """PyTorch ``nn.Linear`` stores (out, in); a Flax ``Dense`` kernel is (in, out)."""
  return x.T


@dataclasses.dataclass(frozen=True)
class WeightRule:
  """``hf_name`` (e.g. ``'model.layers.0.self_attn.q_proj.weight'``) <-> ``path`` (the variable's
  slash-joined path in the model's unscanned layout, e.g. ``'params/layers_0/attn/q/kernel'``)."""
  hf_name: str
  path: str
  to_deepflow: Transform = identity
  to_hf: Transform = identity
