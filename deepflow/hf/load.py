"""``load_pretrained(DIR)``: a Hugging Face checkpoint as a deepflow model and its variables.

The model is built from config.json (the family's ``model_section``), its variables' shapes
taken from ``jax.eval_shape`` of its ``init`` (nothing initialised), and every checkpoint
tensor is read, converted (its ``WeightRule``) and placed on its devices in its sharding before
the next one is read: host memory holds one tensor (with ``scan_layers``, one variable's
layers) beyond what the devices hold. A checkpoint's dtype is kept unless ``dtype`` asks
otherwise, so a bfloat16 checkpoint loads as bfloat16 with no float32 copy.
"""
from __future__ import annotations

import re
import types
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, Sharding, SingleDeviceSharding

from deepflow import hf, models, parallel  # noqa: F401  (models fills MODELS)
from deepflow.hf import files
from deepflow.hf.rules import WeightRule
from deepflow.registry import ConfigError, MODELS, some_names

LAYER = re.compile(r"(^|/)block(\d+)/")


def stacked_path(path: str) -> str:
  """The ``scan_layers`` name of the unscanned variable ``path``: ``block{i}/`` becomes
  ``blocks/block/`` (``layers.block_stack``'s layout; the layer is an index on its first axis)."""
  return LAYER.sub(r"\1blocks/block/", path, count=1)


def load_pretrained(directory: str, *, dtype: Any = None, mesh: Mesh | None = None,
                    parallel_config: Any = None, **fields: Any) -> tuple[nn.Module, dict]:
  """(model, variables) from a Hugging Face checkpoint directory (config.json and
  model.safetensors, or shards and model.safetensors.index.json), such that
  ``model.apply(variables, tokens)`` gives the checkpoint's logits (tokens (B, T) ints for a
  language model; NHWC images for a vision model).

  ``dtype``: the variables' dtype (default: the checkpoint's). ``mesh``: place the variables
  with deepflow's sharding rules (``parallel_config``, a config's ``parallel`` section; default
  plain data parallelism: no rules, no FSDP) over it; default: the first device. ``fields``: ``dropout``, ``scan_layers``,
  ``remat_policy``. Problems with the directory are one line naming the file and the fix."""
  refused = sorted(set(fields) - set(hf.COMPATIBLE))
  if refused:
    raise ConfigError(f"load_pretrained takes {', '.join(hf.COMPATIBLE)} (the checkpoint fixes "
                      f"the rest), not {', '.join(refused)}")
  config = files.read_config(directory)
  family = hf.family(config["model_type"], f"{directory}/{files.CONFIG}")
  model = build(family.model_section(config), fields)
  variables = read_variables(directory, config, family, model, dtype, mesh, parallel_config)
  return model, variables


def build(section: dict, fields: dict) -> nn.Module:
  """The model a family's section describes, with ``fields`` applied."""
  section = {**section, **fields}
  name = section.pop("name")
  num_outputs = section.pop("num_outputs", None) or section["vocab_size"]
  return MODELS.get(name)(num_outputs=num_outputs, **section)


def read_variables(directory: str, config: dict, family: Any, model: nn.Module, dtype: Any,
                   mesh: Mesh | None, parallel_config: Any) -> dict:
  """The model's variables, every one read from the checkpoint and placed."""
  example = getattr(family, "example_inputs", lambda c: np.zeros((1, 1), np.int32))(config)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), example)
  flat = read_into(directory, config, family, traverse_util.flatten_dict(abstract, sep="/"),
                   _shardings(abstract, mesh, parallel_config),
                   scanned=getattr(model, "scan_layers", False), dtype=dtype)
  return traverse_util.unflatten_dict(flat, sep="/")


def read_into(directory: str, config: dict, family: Any, target: dict[str, Any],
              shardings: dict[str, Sharding], *, scanned: bool, dtype: Any = None,
              fresh: Callable[[str], bool] = lambda path: False) -> dict[str, jax.Array]:
  """Every variable of ``target`` (flat names -> shapes) but the ``fresh`` ones, read from the
  checkpoint and placed with its sharding, in ``dtype``: None keeps the checkpoint's, 'model'
  takes the target's (a training state's float32), else that dtype."""
  rules = family.weight_rules(config)
  reader = files.Reader(files.weight_files(directory))
  names = _match(rules, reader.files, getattr(family, "UNUSED", ()), directory)
  groups = _groups(rules, scanned)
  missing = sorted(p for p in set(target) - set(groups) if not fresh(p))
  unknown = sorted(set(groups) - set(target))
  if missing or unknown:
    raise ConfigError(f"{directory}: the {config['model_type']} checkpoint does not fit the "
                      f"model (no tensor for {some_names(missing)}; no variable for "
                      f"{some_names(unknown)})")
  return {path: _place(path, layers, target[path], shardings[path], reader, names,
                       target[path].dtype if isinstance(dtype, str) and dtype == "model"
                       else dtype)
          for path, layers in groups.items() if not fresh(path)}


def _shardings(abstract: Any, mesh: Mesh | None, parallel_config: Any) -> dict[str, Sharding]:
  if mesh is None:
    one = SingleDeviceSharding(jax.devices()[0])
    return traverse_util.flatten_dict(jax.tree.map(lambda _: one, abstract), sep="/")
  if parallel_config is None:  # the base config's strategy, without importing the config module
    parallel_config = types.SimpleNamespace(strategy="data", rules=[])
  return traverse_util.flatten_dict(
      parallel.state_shardings(abstract, mesh, parallel_config), sep="/")


def _match(rules: list[WeightRule], present: dict[str, str], unused: tuple[str, ...],
           directory: str) -> dict[str, str]:
  """rule name -> the checkpoint's name for it. A base model saved alone lacks the task
  model's prefix (``transformer.``, ``model.``): a name is found with or without its first
  component. Tensors no rule reads (and no ``unused`` pattern names), and rules no tensor
  answers, are one line."""
  found, missing = {}, []
  for rule in rules:
    short = rule.hf_name.partition(".")[2]
    name = rule.hf_name if rule.hf_name in present else short if short in present else None
    if name is None:
      missing.append(rule.hf_name)
    else:
      found[rule.hf_name] = name
  read = set(found.values())
  skip = [re.compile(p) for p in unused]
  extra = sorted(n for n in present if n not in read and not any(p.search(n) for p in skip))
  if missing or extra:
    parts = [f"missing {len(missing)}: {some_names(missing)}" if missing else "",
             f"unexpected {len(extra)}: {some_names(extra)}" if extra else ""]
    raise ConfigError(f"{directory}: the weights do not fit its config.json "
                      f"({'; '.join(p for p in parts if p)}); the checkpoint is incomplete or "
                      f"its config.json belongs to another model")
  return found


def _groups(rules: list[WeightRule], scanned: bool) -> dict[str, list[tuple[int, WeightRule]]]:
  """variable path -> its (layer, rule) pairs: one pair, or with ``scanned`` the layers
  ``block{i}`` stacked in ``blocks/block``."""
  groups: dict[str, list] = {}
  for rule in rules:
    match = LAYER.search(rule.path) if scanned else None
    if match:
      path = stacked_path(rule.path)
      groups.setdefault(path, []).append((int(match.group(2)), rule))
    else:
      groups.setdefault(rule.path, []).append((-1, rule))
  return groups


def _place(path: str, layers: list[tuple[int, WeightRule]], target: Any, sharding: Sharding,
           reader: files.Reader, names: dict[str, str], dtype: Any) -> jax.Array:
  """One variable, read tensor by tensor (layer by layer) and put on its devices."""
  first = names[layers[0][1].hf_name]
  want = np.dtype(dtype) if dtype is not None else reader.dtype(first)
  if jax.dtypes.canonicalize_dtype(want) != want:
    raise ConfigError(f"{reader.files[first]}: tensor {first!r} is {want}, which JAX holds only "
                      f"with jax_enable_x64; load with dtype='float32'")
  stacked = layers[0][0] >= 0
  value = np.empty(target.shape, want) if stacked else None
  for layer, rule in layers:
    name = names[rule.hf_name]
    tensor = rule.to_deepflow(reader.read(name))
    shape = target.shape[1:] if stacked else target.shape
    if tuple(tensor.shape) != tuple(shape):
      raise ConfigError(f"{reader.files[name]}: tensor {name!r} has shape "
                        f"{reader.shape(name)}, which does not fit {path} {tuple(shape)}; its "
                        f"config.json belongs to another model")
    if stacked:
      value[layer] = tensor
    else:
      value = tensor.astype(want, copy=False)
  return _put(value, sharding)


def _put(value: np.ndarray, sharding: Sharding) -> jax.Array:
  """A host array on its devices, each device given its piece (a view: JAX copies it, or on
  CPU may keep the host buffer as the device's, which nothing changes afterwards)."""
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
