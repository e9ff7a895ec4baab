"""The model section of a run that starts from a Hugging Face checkpoint
(``model.init_from='hf:DIR'``), filled at config time from DIR/config.json.

An experiment then names no sizes: the family's ``model_section`` gives the model's name and
fields. A field the config sets to another value than the checkpoint's is refused in one line,
except those that change how the model runs, not what it computes (``hf.COMPATIBLE``: dropout,
scan_layers, remat_policy) and the transfer keys (``model.lora``, ``model.init_skip``). The
weights are read when the run starts (``deepflow.hf.finetune``).
"""
from __future__ import annotations

import os
from typing import Any

from deepflow import hf
from deepflow.hf import files
from deepflow.registry import ConfigError

PREFIX = "hf:"


def directory_of(init_from: Any) -> str | None:
  """DIR of an ``'hf:DIR'`` init_from value, else None."""
  if isinstance(init_from, str) and init_from.startswith(PREFIX):
    return init_from[len(PREFIX):]
  return None


def fill_model_section(model: Any) -> None:
  """Sets the model section (a ConfigDict, changed in place) to the checkpoint's name and
  fields; a field already set to something else is one line, unless ``hf.COMPATIBLE``.

  A run's saved config is complete: reopened (eval, export) after its source directory moved,
  it is taken as it is."""
  directory = directory_of(model.get("init_from"))
  if not os.path.isdir(directory) and model.get("name") not in (None, "mlp"):
    return
  config = files.read_config(directory)
  where = f"{directory}/{files.CONFIG}"
  section = hf.family(config["model_type"], where).model_section(config)
  if model.get("init_map") or model.get("init_layout", "deepflow") != "deepflow":
    raise ConfigError("model.init_map and model.init_layout do not apply to model.init_from="
                      "'hf:...' (the checkpoint's family maps its tensors); leave them unset")
  for key, value in section.items():
    if key == "num_outputs":  # the dataset's, as for every model (a new head when it differs)
      continue
    given = model.get(key)
    if key in hf.COMPATIBLE and given is not None:
      continue
    unset = given is None or (key == "name" and given == "mlp")  # base_config's default name
    if not unset and given != value:
      raise ConfigError(f"model.{key}={given!r} contradicts {where} ({key}={value!r}); "
                        f"model.init_from='hf:...' takes the checkpoint's architecture: leave "
                        f"model.{key} unset (settable: {', '.join(hf.COMPATIBLE)}, lora)")
    model[key] = value


def fill_tokenizer(data: Any, model: Any) -> None:
  """``data.tokenizer`` left unset becomes the checkpoint's own (``hf:DIR``) when its directory
  has a ``tokenizer.json``: the data's ids are then the model's."""
  from deepflow.data import tokenizers
  if not data.get("tokenizer"):
    data.tokenizer = tokenizers.hf_spec(directory_of(model.get("init_from"))) or ""
