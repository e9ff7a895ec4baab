"""Model families. Importing this package registers every model in ``deepflow.registry.MODELS``.

Contract for every model: a Flax Linen module whose first field is ``num_outputs`` (filled in
from the dataset by the builder) and whose ``__call__(x, *, train=False)`` is pure; stochastic
layers draw from the ``'dropout'`` RNG stream; mutable state (batch norm) lives in the
``'batch_stats'`` collection.
"""
import dataclasses
from typing import Any

from deepflow.models import cnn, contrastive, decoding, gan, layers, llama, lora, mlp, resnet, rnn, transformer, vit  # noqa: F401,E501  (registration)


# The model section's keys that are not the architecture's fields: where its weights start
# (deepflow.train.init_from), its adapters (deepflow.models.lora) and the integer form it trains
# for (deepflow.qat).
TRANSFER_KEYS = ("init_from", "init_map", "init_skip", "init_layout", "lora", "quantization")


def model_fields(model_config: Any) -> dict[str, Any]:
  """The architecture's own fields of a ``model`` config section (its name and TRANSFER_KEYS
  left out), as the module's constructor takes them."""
  return {k: v for k, v in model_config.items() if k != "name" and k not in TRANSFER_KEYS}


def model_options(model_cls: type) -> dict[str, Any]:
  """A Linen module's configurable fields and defaults (everything but num_outputs/parent/name)."""
  options = {}
  for f in dataclasses.fields(model_cls):
    if f.name in ("parent", "name", "num_outputs") or not f.init:
      continue
    default = f.default if f.default is not dataclasses.MISSING else None
    options[f.name] = tuple(default) if isinstance(default, list) else default
  return options
