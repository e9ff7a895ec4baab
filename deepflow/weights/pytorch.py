"""The layout map from a PyTorch ``state_dict`` to deepflow's tensor names
(``model.init_layout='pytorch'``, applied before ``model.init_map``).

| PyTorch (``module.sub.0.weight``)              | deepflow (``params/module/sub/0/...``)     |
|---|---|
| ``Conv2d.weight`` (out, in, kh, kw): OIHW      | ``kernel`` (kh, kw, in, out): HWIO          |
| ``Linear.weight`` (out, in)                    | ``kernel`` (in, out): transposed            |
| ``BatchNorm/LayerNorm.weight``, ``.bias``      | ``scale``, ``bias``                         |
| ``BatchNorm.running_mean``, ``.running_var``   | ``batch_stats/.../mean``, ``var``           |
| ``BatchNorm.num_batches_tracked``              | dropped (Flax keeps no count)               |
| ``Embedding.weight`` (num, dim)                | ``embedding`` (name it with init_map: a     |
|                                                | 2-D ``weight`` is read as a Linear)         |

Dots become '/', so module paths keep PyTorch's names (``features/0``); ``model.init_map`` then
renames them to the Flax modules' (``features/0/`` -> ``Conv_0/``). What the map cannot see:
a Linear after ``torch.flatten`` of NCHW features reads them in (C, H, W) order, Flax's
``reshape`` of NHWC in (H, W, C), so such a kernel's rows need permuting (global pooling before
the Linear, as in the tested fixture, needs nothing); PyTorch's ``padding=1`` on a stride-2
convolution pads both sides, Flax's ``'SAME'`` pads the end only (pad explicitly to match);
BatchNorm's ``momentum=0.1`` is Flax's ``momentum=0.9``; ``eps`` defaults agree (1e-5).
"""
from __future__ import annotations

import numpy as np

STATS = {"running_mean": "mean", "running_var": "var"}


def from_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A PyTorch ``state_dict`` (as numpy arrays) under deepflow's names and layouts."""
  out = {}
  for name, value in state_dict.items():
    module, _, leaf = name.rpartition(".")
    path = module.replace(".", "/")
    if leaf == "num_batches_tracked":
      continue
    if leaf in STATS:
      out[f"batch_stats/{path}/{STATS[leaf]}"] = value
      continue
    if leaf == "weight":
      leaf, value = _weight(value)
    out[f"params/{path}/{leaf}"] = value
  return out


def _weight(value: np.ndarray) -> tuple[str, np.ndarray]:
  """A ``weight``'s Flax name and layout, from its number of axes."""
  if value.ndim == 1:  # normalization layers
    return "scale", value
  if value.ndim == 2:  # Linear: y = x W^T + b; Flax: y = x K + b
    return "kernel", value.T
  # ConvNd: (out, in, *spatial) -> (*spatial, in, out)
  return "kernel", np.transpose(value, (*range(2, value.ndim), 1, 0))
