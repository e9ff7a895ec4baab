"""A deepflow model written as a Hugging Face checkpoint (``deepflow export --format hf``):
config.json from the family that computes the same as the model, and safetensors weights under
``transformers``' names and layouts, sharded with ``model.safetensors.index.json`` past
``max_shard_bytes``; a run's tokenizer files beside them.

``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` then gives deepflow's logits
(``tools/hf_compare.py`` checks it), and ``deepflow.load_pretrained(DIR)`` reads it back.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
from typing import Any

import flax.linen as nn
import numpy as np
from flax import traverse_util

from deepflow import hf, models, parallel  # noqa: F401  (models fills MODELS)
from deepflow.atomic import write_atomic
from deepflow.data import tokenizers
from deepflow.hf import files
from deepflow.hf.load import LAYER, stacked_path
from deepflow.registry import ConfigError, MODELS, some_names
from deepflow.train.experiment import RunSource

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MAX_SHARD_BYTES = 5 * 2 ** 30  # transformers' default shard size
SHARD = "model-{:05d}-of-{:05d}.safetensors"


def describe(model: nn.Module) -> dict[str, Any]:
  """The model's registry name and every field's value (sizes as built, e.g. the vocabulary
  a language model took from its data): what a family's ``hf_config`` reads."""
  names = [n for n in MODELS.names() if MODELS.get(n) is type(model)]
  if not names:
    raise ConfigError(f"{type(model).__name__} is not a registered deepflow model")
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.name not in ("parent", "name")}
  return {"name": names[0], **fields}


def hf_checkpoint_config(model: nn.Module) -> tuple[Any, dict]:
  """(family, config.json) of the first family that writes ``model``; none is one line with
  each family's reason."""
  description, reasons = describe(model), []
  for family in hf.families():
    try:
      return family, family.hf_config(description)
    except ConfigError as e:
      reasons.append(str(e))
  raise ConfigError(f"model {description['name']!r} cannot be written as a Hugging Face "
                    f"checkpoint: {'; '.join(reasons)}")


def write_pretrained(model: nn.Module, variables: Any, out: str, *, dtype: Any = None,
                     max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
  """Writes ``variables`` of ``model`` (LoRA already merged: ``Experiment.model_params``) to the
  directory ``out`` as a Hugging Face checkpoint, tensors in ``dtype`` (default: the
  variables'). Returns the files written. config.json is written last, so an interrupted
  export is no checkpoint."""
  family, config = hf_checkpoint_config(model)
  flat = traverse_util.flatten_dict(parallel.to_host(dict(variables)), sep="/")
  rules = family.weight_rules(config)
  tensors = {rule.hf_name: (rule, _variable(flat, rule.path)) for rule in rules}
  used = {stacked_path(r.path) for r in rules} | {r.path for r in rules}
  left = sorted(set(flat) - used)
  if left:
    raise ConfigError(f"{some_names(left)} have no place in a {config['model_type']} "
                      f"checkpoint (merge LoRA adapters first: Experiment.model_params)")
  dtype = np.dtype(dtype) if dtype is not None else None
  config["dtype"] = str(dtype or next(iter(tensors.values()))[1].dtype)
  sizes = [(name, int(np.prod(value.shape)) * (dtype or value.dtype).itemsize)
           for name, (_, value) in tensors.items()]
  # Tensors that hold no variable (ResNet's num_batches_tracked), in their own dtype.
  fixed = getattr(family, "fixed_tensors", lambda config: {})(config)
  groups = list(files.shards(sizes, max_shard_bytes))
  os.makedirs(out, exist_ok=True)
  for stale in glob.glob(os.path.join(out, "model*.safetensors*")):
    os.remove(stale)
  written, weight_map = [], {}
  for k, group in enumerate(groups):
    name = files.WEIGHTS if len(groups) == 1 else SHARD.format(k + 1, len(groups))
    shard = {}
    for hf_name in group:
      rule, value = tensors[hf_name]
      shard[hf_name] = np.asarray(rule.to_hf(np.asarray(value)), dtype or value.dtype)
      weight_map[hf_name] = name
    if k == 0:
      shard.update(fixed)
      weight_map.update(dict.fromkeys(fixed, name))
    files.write_safetensors(os.path.join(out, name), shard)
    written.append(name)
  if len(groups) > 1:
    index = {"metadata": {"total_size": sum(s for _, s in sizes)}, "weight_map": weight_map}
    _write_json(os.path.join(out, files.INDEX), index)
    written.append(files.INDEX)
  _write_json(os.path.join(out, files.CONFIG), config)
  return [*written, files.CONFIG]


def _variable(flat: dict[str, Any], path: str) -> Any:
  """The unscanned variable ``path``: itself, or its layer of the scanned stack."""
  if path in flat:
    return flat[path]
  match = LAYER.search(path)
  stacked = stacked_path(path) if match else None
  if stacked not in flat:
    raise ConfigError(f"the model has no variable {path} that its checkpoint layout needs")
  return flat[stacked][int(match.group(2))]


def _write_json(path: str, value: dict) -> None:
  write_atomic(path, json.dumps(value, indent=2) + "\n")


def export_run(run: RunSource | str, out: str, *, dtype: Any = None,
               max_shard_bytes: int = MAX_SHARD_BYTES) -> tuple[list[str], int]:
  """A checkpoint of ``run`` (a workdir or a ``RunSource``; LoRA merged) as a Hugging Face
  checkpoint in ``out``, with the run's Hugging Face tokenizer (``data.tokenizer='hf:...'``: the
  copy in its workdir) beside it. Returns (files written, step)."""
  source = RunSource.of(run)
  exp, state, step, _ = source.open()
  variables = {"params": exp.model_params(state.params), **state.model_state}
  written = write_pretrained(exp.task.model, variables, out, dtype=dtype,
                             max_shard_bytes=max_shard_bytes)
  saved = os.path.join(source.workdir, tokenizers.HF_TOKENIZER_DIR)  # data.tokenizer's copy
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(saved, name)):
      shutil.copyfile(os.path.join(saved, name), os.path.join(out, name))
      written.append(name)
  return written, step
