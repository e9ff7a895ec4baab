"""Hugging Face checkpoints in and out: ``load.load_pretrained(DIR)`` (``deepflow.load_pretrained``)
builds the deepflow model a checkpoint's ``config.json`` describes and loads its safetensors
weights; ``export.write_pretrained`` (and ``deepflow export --format hf``) writes a model back
as a checkpoint ``transformers`` loads; ``model.init_from='hf:DIR'`` trains from one
(``section``: the model section at config time, ``finetune``: the first state).

A family module (``deepflow/hf/<family>.py``) knows one kind of checkpoint:

  MODEL_TYPES                     the config.json ``model_type`` values it reads
  model_section(hf_config)        the deepflow ``model`` config section (``name`` and fields;
                                  ``num_outputs`` too where it is not ``vocab_size``)
  hf_config(model)                config.json for a model (its section, sizes resolved); a
                                  ConfigError when the model is not of this family
  weight_rules(hf_config)         one ``rules.WeightRule`` per checkpoint tensor
  UNUSED (optional)               regexes of checkpoint tensors that are read by nothing
                                  (buffers, a tied head's copy)
  example_inputs(hf_config)       (optional) a batch of one input for ``init``; default: int
                                  tokens (1, 1)

Rules name variables in the unscanned layout (``params/block{i}/...``); with ``scan_layers``
the core stacks ``block{i}`` into ``blocks/block`` (``layers.block_stack``'s layout) itself.
Families are imported on first use, by model_type.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from deepflow.registry import ConfigError

# Model fields a caller may set on a pretrained model: they change how it runs (and trains), not
# what it computes.
COMPATIBLE = ("dropout", "scan_layers", "remat_policy")
FAMILIES = {"gpt2": "deepflow.hf.gpt2", "llama": "deepflow.hf.llama",
            "mistral": "deepflow.hf.llama", "qwen2": "deepflow.hf.llama",
            "qwen3": "deepflow.hf.llama", "vit": "deepflow.hf.vit",
            "resnet": "deepflow.hf.resnet"}


def family(model_type: str, source: str = "config.json") -> ModuleType:
  """The family module reading ``model_type``; an unsupported one is one line listing those
  that are."""
  if model_type not in FAMILIES:
    raise ConfigError(f"{source}: model_type {model_type!r} is not supported; supported: "
                      f"{', '.join(sorted(FAMILIES))}")
  return importlib.import_module(FAMILIES[model_type])


def families() -> list[ModuleType]:
  """Every family module that is present, each once (for export: which one writes a model)."""
  found = []
  for name in dict.fromkeys(FAMILIES.values()):
    try:
      found.append(importlib.import_module(name))
    except ModuleNotFoundError as e:
      if e.name != name:
        raise
  return found
