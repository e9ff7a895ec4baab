"""Inference artifacts: ``deepflow export`` writes one from a run (this module); ``deepflow
predict`` runs it (``deepflow.predict``, which needs JAX and numpy only and describes the files).
``deepflow export --format safetensors`` writes the weights alone (``export_safetensors``).

``export(workdir, out)`` reopens a checkpoint of the run (``Experiment.from_workdir``), traces the
fitted eval-time preprocessing and the model in eval mode into one function, serializes it with
``jax.export`` (a symbolic batch dimension, lowered for cpu, cuda and tpu) and writes it with its
weights and a ``signature.json`` carrying both files' checksums.
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import deepflow
from deepflow import parallel, pruning, qat, quantize as quantize_lib
from deepflow.atomic import atomic_path, write_atomic
from deepflow.data import sources, transforms as transforms_lib
from deepflow.predict import (FORMAT, FORMAT_VERSION, MODEL_FILE, SIGNATURE_FILE,
                              WEIGHTS_FILE, sha256)
from deepflow.registry import ConfigError
from deepflow.train.experiment import Experiment, RunSource
from deepflow.weights import files

SAFETENSORS_FILE = "model.safetensors"

PLATFORMS = ("cpu", "cuda", "tpu")
STATS_PREFIX = "preprocessing/"


def _input_chain(exp: Experiment, *, per_example: bool = False
                 ) -> list[tuple[int, transforms_lib.Transform]]:
  """The batch transforms (with their index in ``data.transforms``) that eval applies to the
  inputs, which the artifact runs (augmentations are training-only, target transforms never see
  an input); with ``per_example``, instead, the per-example ones (``deepflow.data.images``:
  variable-size images to one shape), which run on the host before the artifact."""
  data = exp.pipeline.dataset
  chain = []
  for i, t in enumerate(exp.pipeline.transforms):
    keys = [transforms_lib.resolve_key(k, data.input_key, data.target_key) for k in t.keys]
    if not t.train_only and data.input_key in keys and t.per_example == per_example:
      chain.append((i, t))
  return chain


def inference_function(exp: Experiment, params: Any, model_state: Any
                       ) -> tuple[Callable[[dict, jax.Array], jax.Array], dict[str, np.ndarray]]:
  """``(fn, weights)``: ``fn(weights, raw_inputs)`` applies the fitted eval-time preprocessing
  (the transforms' own ``apply``, traced) and then the model in eval mode, exactly as
  ``Experiment.evaluate`` does with numpy on the host; ``weights`` are its host-side arguments.
  The statistics are arguments rather than constants so the artifact keeps them inspectable."""
  chain = _input_chain(exp)
  for i, t in chain:
    if not t.numeric:  # e.g. tokenize: Python string handling, which cannot be traced
      raise ConfigError(f"transform {exp.config.data.transforms[i]['name']!r} runs on the host "
                        f"(non-numeric inputs) and cannot be part of an exported model")
  weights = traverse_util.flatten_dict(
      {"params": parallel.to_host(params), "model_state": parallel.to_host(model_state)}, sep="/")
  for i, _ in chain:
    for key, value in exp.pipeline.stats[i].items():
      weights[f"{STATS_PREFIX}{i}/{key}"] = value
  # The in_avals of the exported function are canonical (float32 without jax_enable_x64): store
  # what it will accept.
  weights = {k: np.asarray(v, jax.dtypes.canonicalize_dtype(np.asarray(v).dtype))
             for k, v in weights.items()}

  def fn(weights: dict[str, jax.Array], inputs: jax.Array) -> jax.Array:
    x = inputs
    for i, t in chain:
      prefix = f"{STATS_PREFIX}{i}/"
      stats = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
      x = t.apply(stats, x.astype(jnp.float32), None)  # numeric: apply_chain casts likewise
    variables = traverse_util.unflatten_dict(
        {k: v for k, v in weights.items() if not k.startswith(STATS_PREFIX)}, sep="/")
    # The float model: a quantization-aware run's integer form is written by ``export``.
    outputs, _ = quantize_lib.float_task(exp.task).apply(
        exp.model_params(variables["params"]), variables.get("model_state", {}), x, None,
        train=False)
    return outputs
  return fn, weights


def raw_example(exp: Experiment) -> np.ndarray:
  """One training input as the artifact takes it, shape (1, ...): raw, or, when per-example
  transforms bring images to one shape, as their eval mode leaves it."""
  example = exp.pipeline.examples(exp.pipeline.train_source, np.arange(1), train=False, step=0)
  return np.asarray(example[exp.pipeline.dataset.input_key])


def exportable(exp: Experiment, state: Any
               ) -> tuple[Callable[[dict, jax.Array], jax.Array], dict[str, np.ndarray],
                          np.ndarray, jax.ShapeDtypeStruct]:
  """``(fn, weights, example, input_spec)`` of a run's checkpoint (``inference_function``, one
  raw example, the inputs' shape with a symbolic batch), or a one-line refusal of inputs no
  exported model can take (text tokenized on the host, non-numeric values)."""
  if exp.config.data.tokenizer:  # its inputs are text, tokenized and packed on the host
    raise ConfigError("deepflow export takes a run on stored examples; this one reads text "
                      "through data.tokenizer, which an exported model cannot take")
  fn, weights = inference_function(exp, state.params, state.model_state)
  example = raw_example(exp)
  if example.dtype.kind not in "biuf":
    raise ConfigError(f"inputs {exp.pipeline.dataset.input_key!r} of dtype {example.dtype} "
                      f"cannot enter an exported model; only numeric inputs can")
  shape = jax.export.symbolic_shape(", ".join(["b", *map(str, example.shape[1:])]))
  return fn, weights, example, jax.ShapeDtypeStruct(
      shape, jax.dtypes.canonicalize_dtype(example.dtype))


def export(run: RunSource | str, out: str, *, platforms: Sequence[str] = PLATFORMS,
           quantize: str | None = None) -> dict[str, Any]:
  """Writes the inference artifact of a checkpoint of ``run`` (a workdir: its 'best' checkpoint,
  the run's result; or a ``RunSource`` naming 'latest' or a step) to ``out``; returns its
  signature. ``quantize='int8'`` or ``'int4'``: its matmuls and convolutions on integers
  (``deepflow.quantize``); a run trained with ``model.quantization`` is quantized so by
  default (``qat.export_scheme``)."""
  source = RunSource.of(run)
  exp, state, step, which = source.open()
  scheme = qat.export_scheme(exp.config, quantize)
  fn, weights, example, input_spec = exportable(exp, state)
  if scheme:
    fn, weights = quantize_lib.quantized_function(fn, weights, input_spec, scheme)
  weight_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()}
  try:
    exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(
        weight_specs, input_spec)
  except ValueError as e:  # e.g. an unknown platform name
    raise ConfigError(f"cannot export for platforms {', '.join(platforms)}: "
                      f"{str(e).splitlines()[0]}") from e

  os.makedirs(out, exist_ok=True)
  write_atomic(os.path.join(out, MODEL_FILE), bytes(exported.serialize()))
  with atomic_path(os.path.join(out, WEIGHTS_FILE)) as tmp:
    # A pruned model's zeros deflate (zip's own compression, which np.load reads as is).
    (np.savez_compressed if pruning.is_pruned(exp.config) else np.savez)(tmp, **weights)
  signature = signature_of(exp, exported.in_avals[-1], exported.out_avals[0], example, step,
                           which, source.workdir)
  signature["platforms"] = list(exported.platforms)
  if scheme:
    signature["quantization"] = {**quantize_lib.description(scheme),
                                 "training": qat.training(exp.config)}
  signature["call"] = (f"jax.export.deserialize(<{MODEL_FILE} bytes>).call(dict(numpy.load("
                       f"'{WEIGHTS_FILE}')), inputs)")
  signature["files"] = {name: sha256(os.path.join(out, name))
                        for name in (MODEL_FILE, WEIGHTS_FILE)}
  write_signature(out, signature)
  return signature


def write_signature(out: str, signature: dict[str, Any]) -> None:
  """Written last: an export interrupted half-way leaves checksums that do not match."""
  write_atomic(os.path.join(out, SIGNATURE_FILE),
               (json.dumps(signature, indent=2) + "\n").encode())


def export_safetensors(run: RunSource | str, out: str
                       ) -> tuple[str, dict[str, np.ndarray], int]:
  """Writes a checkpoint's variables as a ``.safetensors`` file under their flat names
  (``params/...``, ``batch_stats/...``; LoRA adapters merged into their kernels), readable by
  the ``safetensors`` library and by ``model.init_from``. ``out`` is the file, or a directory
  to write ``model.safetensors`` in. Returns (path, tensors, step)."""
  exp, state, step, which = RunSource.of(run).open()
  path = out if out.endswith(".safetensors") else os.path.join(out, SAFETENSORS_FILE)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tensors = files.flatten(parallel.to_host(
      {"params": exp.model_params(state.params), **state.model_state}))
  files.write_safetensors(tensors, path, metadata={
      "format": "deepflow", "model": exp.config.model.name, "step": str(step),
      "checkpoint": which})
  return path, tensors, step


def signature_of(exp: Experiment, inputs: Any, outputs: Any, example: np.ndarray, step: int,
                 which: str, workdir: str) -> dict[str, Any]:
  """``signature.json`` of an artifact whose function maps ``inputs`` to ``outputs`` (abstract
  values, batch symbolic), less what only its format knows (``platforms``, ``call``, ``files``)."""
  config, data = exp.config, exp.pipeline.dataset
  classify = config.task.name == "classification"
  chain = _input_chain(exp)
  entries = list(config.data.transforms)
  target_transforms = [entries[i]["name"] for i, t in enumerate(exp.pipeline.transforms)
                       if not t.train_only and any(
                           transforms_lib.resolve_key(k, data.input_key, data.target_key)
                           == data.target_key for k in t.keys)]
  output = {"kind": "logits" if classify else "values", "shape": _dims(outputs.shape),
            "dtype": str(outputs.dtype)}
  if classify:
    output["class_names"] = _class_names(data, exp.pipeline.spec.num_classes)
  if target_transforms:  # the model predicts preprocessed targets; say so rather than guess
    output["note"] = f"values are targets as transformed by: {', '.join(target_transforms)}"
  return {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "deepflow_version": deepflow.__version__,
      "jax_version": jax.__version__,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "source": {"workdir": workdir if "://" in workdir else os.path.abspath(workdir),
                 "step": int(step), "checkpoint": which,
                 "task": config.task.name, "model": config.model.name,
                 "data": config.data.source},
      "input": {"name": data.input_key, "shape": _dims(inputs.shape),
                "dtype": str(inputs.dtype),
                "raw_dtype": str(example.dtype),
                "accepts_missing": any(t.handles_missing for _, t in chain)},
      "output": output,
      "preprocessing": [
          {"name": entries[i]["name"],
           "options": {k: v for k, v in dict(entries[i]).items() if k != "name"},
           "statistics": {k: list(np.shape(v)) for k, v in exp.pipeline.stats[i].items()}}
          for i, _ in chain],
      # Per-example steps (decoded image -> one shape) run before the artifact, in eval mode.
      "host_preprocessing": [
          {"name": entries[i]["name"],
           "options": {k: v for k, v in dict(entries[i]).items() if k != "name"}}
          for i, _ in _input_chain(exp, per_example=True)],
  }


def _dims(shape: Sequence[Any]) -> list[int | None]:
  """A shape for JSON: symbolic dimensions (the batch) as null."""
  return [None if jax.export.is_symbolic_dim(d) else int(d) for d in shape]


def _class_names(dataset: sources.Dataset, num_classes: int) -> list[str]:
  """The target's ClassLabel names for TFDS-backed datasets, else '0', '1', ..."""
  builder = getattr(dataset.splits, "builder", None)
  if builder is not None:
    feature = builder.info.features[dataset.target_key]
    names = getattr(feature, "names", None)
    if names and len(names) == num_classes:
      return [str(n) for n in names]
  return [str(i) for i in range(num_classes)]
