"""Inference artifacts: ``deepflow export`` writes one from a run, ``deepflow predict`` runs it.

An artifact is a directory that needs JAX and numpy only (no experiment file, no config):

  model.bin       the inference function (raw inputs -> model outputs: the fitted eval-time
                  preprocessing, then the model in eval mode) as serialized StableHLO from
                  ``jax.export``, with a symbolic batch dimension, lowered for cpu, cuda and tpu
  weights.npz     that function's first argument: parameters, model state and preprocessing
                  statistics, keyed by '/'-joined path ('params/Dense_0/kernel',
                  'preprocessing/0/mean', ...)
  signature.json  input shape and dtype, what the outputs mean (class names), the preprocessing,
                  where the model came from, and the SHA-256 of both files (a corrupted artifact
                  is refused with one line instead of computing garbage)

By hand: ``jax.export.deserialize(open('model.bin', 'rb').read()).call(
dict(numpy.load('weights.npz')), inputs)``.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import deepflow
from deepflow import parallel
from deepflow.data import sources, transforms as transforms_lib
from deepflow.registry import ConfigError
from deepflow.train.experiment import Experiment

MODEL_FILE, WEIGHTS_FILE, SIGNATURE_FILE = "model.bin", "weights.npz", "signature.json"
FORMAT, FORMAT_VERSION = "deepflow-inference", 1
PLATFORMS = ("cpu", "cuda", "tpu")
STATS_PREFIX = "preprocessing/"


class ArtifactError(ConfigError):
  """A missing or corrupted artifact, or inputs it does not accept: one line, no traceback."""


# ------------------------------------------------------------------------------------------------
# Export.
# ------------------------------------------------------------------------------------------------

def _input_chain(exp: Experiment) -> list[tuple[int, transforms_lib.Transform]]:
  """The transforms (with their index in ``data.transforms``) that eval applies to the inputs:
  augmentations are training-only and target transforms never see an input."""
  data = exp.pipeline.dataset
  chain = []
  for i, t in enumerate(exp.pipeline.transforms):
    keys = [transforms_lib.resolve_key(k, data.input_key, data.target_key) for k in t.keys]
    if not t.train_only and data.input_key in keys:
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
    outputs, _ = exp.task.apply(variables["params"], variables.get("model_state", {}), x, None,
                                train=False)
    return outputs
  return fn, weights


def raw_example(exp: Experiment) -> np.ndarray:
  """One raw (unpreprocessed) training input, shape (1, ...): what the artifact takes."""
  data = exp.pipeline.dataset
  return np.asarray(sources.take(exp.pipeline.train_source, np.arange(1))[data.input_key])


def export(workdir: str, out: str, *, overrides: Iterable[str] = (),
           platforms: Sequence[str] = PLATFORMS, checkpoint: str | int = "best"
           ) -> dict[str, Any]:
  """Writes the inference artifact of a checkpoint of a run ('best', the default: the run's
  result; 'latest'; or a step: ``Experiment.from_workdir``) to ``out``; returns its signature."""
  exp, state, step, which = Experiment.from_workdir(workdir, overrides, checkpoint=checkpoint)
  fn, weights = inference_function(exp, state.params, state.model_state)
  example = raw_example(exp)
  if example.dtype.kind not in "biuf":
    raise ConfigError(f"inputs {exp.pipeline.dataset.input_key!r} of dtype {example.dtype} "
                      f"cannot enter an exported model; only numeric inputs can")
  dtype = jax.dtypes.canonicalize_dtype(example.dtype)
  shape = jax.export.symbolic_shape(", ".join(["b", *map(str, example.shape[1:])]))
  weight_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()}
  try:
    exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(
        weight_specs, jax.ShapeDtypeStruct(shape, dtype))
  except ValueError as e:  # e.g. an unknown platform name
    raise ConfigError(f"cannot export for platforms {', '.join(platforms)}: "
                      f"{str(e).splitlines()[0]}") from e

  os.makedirs(out, exist_ok=True)
  _write_atomic(os.path.join(out, MODEL_FILE), bytes(exported.serialize()))
  tmp = os.path.join(out, WEIGHTS_FILE + ".tmp.npz")
  np.savez(tmp, **weights)
  os.replace(tmp, os.path.join(out, WEIGHTS_FILE))
  signature = _signature(exp, exported, example, step, which, workdir)
  signature["files"] = {name: _sha256(os.path.join(out, name))
                        for name in (MODEL_FILE, WEIGHTS_FILE)}
  # Written last: an export interrupted half-way leaves checksums that do not match.
  _write_atomic(os.path.join(out, SIGNATURE_FILE),
                (json.dumps(signature, indent=2) + "\n").encode())
  return signature


def _signature(exp: Experiment, exported: Any, example: np.ndarray, step: int, which: str,
               workdir: str) -> dict[str, Any]:
  config, data = exp.config, exp.pipeline.dataset
  classify = config.task.name == "classification"
  chain = _input_chain(exp)
  entries = list(config.data.transforms)
  target_transforms = [entries[i]["name"] for i, t in enumerate(exp.pipeline.transforms)
                       if not t.train_only and any(
                           transforms_lib.resolve_key(k, data.input_key, data.target_key)
                           == data.target_key for k in t.keys)]
  output = {"kind": "logits" if classify else "values",
            "shape": _dims(exported.out_avals[0].shape),
            "dtype": str(exported.out_avals[0].dtype)}
  if classify:
    output["class_names"] = _class_names(data, exp.pipeline.spec.num_classes)
  if target_transforms:  # the model predicts preprocessed targets; say so rather than guess
    output["note"] = f"values are targets as transformed by: {', '.join(target_transforms)}"
  inputs = exported.in_avals[-1]  # in_avals are flat: the weights' leaves, then the inputs
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
      "platforms": list(exported.platforms),
      "call": f"jax.export.deserialize(<{MODEL_FILE} bytes>).call(dict(numpy.load("
              f"'{WEIGHTS_FILE}')), inputs)",
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


def _write_atomic(path: str, data: bytes) -> None:
  with open(path + ".tmp", "wb") as f:
    f.write(data)
  os.replace(path + ".tmp", path)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


# ------------------------------------------------------------------------------------------------
# Loading and running an artifact.
# ------------------------------------------------------------------------------------------------

class Predictor:
  """A loaded artifact: ``predictor(inputs)`` checks the inputs against the signature and
  returns the model's outputs as numpy (logits for a classifier)."""

  def __init__(self, directory: str):
    self.directory = directory
    self.signature = _read_signature(directory)
    for name, expected in self.signature["files"].items():
      path = os.path.join(directory, name)
      if not os.path.exists(path):
        raise ArtifactError(f"corrupted artifact {directory}: {name} is missing")
      if _sha256(path) != expected:
        raise ArtifactError(f"corrupted artifact {directory}: {name} does not match its "
                            f"checksum in {SIGNATURE_FILE}; export it again")
    try:
      with open(os.path.join(directory, MODEL_FILE), "rb") as f:
        self.exported = jax.export.deserialize(bytearray(f.read()))
      with np.load(os.path.join(directory, WEIGHTS_FILE), allow_pickle=False) as f:
        self.weights = {k: f[k] for k in f.files}
    except Exception as e:  # checksums matched, so the files were written broken
      raise ArtifactError(f"corrupted artifact {directory}: {type(e).__name__}: "
                          f"{_first_line(e)}") from e
    spec = self.signature["input"]
    self.input_shape = tuple(spec["shape"][1:])
    self.input_dtype = np.dtype(spec["dtype"])
    self.class_names = self.signature["output"].get("class_names")

  def check(self, inputs: Any) -> np.ndarray:
    """The inputs as a batch of the artifact's shape and dtype, or a one-line ``ArtifactError``.
    One example without the batch axis is accepted too."""
    x = np.asarray(inputs)
    expected = "(batch, " + ", ".join(map(str, self.input_shape)) + ")"
    if x.shape == self.input_shape:
      x = x[None]
    if x.shape[1:] != self.input_shape or x.ndim != len(self.input_shape) + 1:
      raise ArtifactError(f"input shape {x.shape} does not match the model's {expected} "
                          f"(or one example of shape {self.input_shape})")
    if len(x) == 0:
      raise ArtifactError("the input holds no examples")
    x = self._cast(x)
    if (np.issubdtype(x.dtype, np.floating) and not self.signature["input"]["accepts_missing"]
        and np.isnan(x).any()):
      raise ArtifactError("the input has missing values (NaN) and the model's preprocessing "
                          "does not impute them")
    return x

  def _cast(self, x: np.ndarray) -> np.ndarray:
    """Converts values of a compatible kind (float64 -> float32, int64 -> int32); refuses the
    rest (floats for an integer model, strings, ...) and integers out of range."""
    want = self.input_dtype
    integers = x.dtype.kind in "iub" and want.kind in "iu"
    if x.dtype == want:
      return x
    if not (np.can_cast(x.dtype, want, "same_kind") or integers):
      raise ArtifactError(f"input dtype {x.dtype} is not accepted by the model, which takes "
                          f"{want}")
    cast = x.astype(want)
    if integers and not np.array_equal(cast, x):
      raise ArtifactError(f"input values are out of the range of the model's dtype {want}")
    return cast

  def __call__(self, inputs: Any) -> np.ndarray:
    x = self.check(inputs)
    try:
      return np.asarray(self.exported.call(self.weights, x))
    except (ValueError, TypeError) as e:  # e.g. exported for platforms this machine lacks
      raise ArtifactError(f"cannot run the artifact here: {_first_line(e)}") from e

  def records(self, outputs: np.ndarray) -> list[dict[str, Any]]:
    """One JSON-ready record per example: class and probabilities for a classifier, else the
    output values."""
    outputs = np.asarray(outputs, np.float64)
    if self.class_names is None:
      return [{"output": row.reshape(-1).tolist()} for row in outputs]
    shifted = np.exp(outputs - outputs.max(-1, keepdims=True))
    probabilities = shifted / shifted.sum(-1, keepdims=True)
    return [{"class": self.class_names[int(i)], "index": int(i),
             "probabilities": [round(float(p), 6) for p in row]}
            for i, row in zip(probabilities.argmax(-1), probabilities)]


def load(directory: str) -> Predictor:
  """The artifact in ``directory``, its files checked against their checksums."""
  return Predictor(directory)


def _read_signature(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, SIGNATURE_FILE)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no artifact directory {directory}")
  if not os.path.exists(path):
    raise ArtifactError(f"{directory} is not a deepflow inference artifact (no {SIGNATURE_FILE})")
  try:
    with open(path) as f:
      signature = json.load(f)
    if signature.get("format") != FORMAT:
      raise ValueError(f"format is {signature.get('format')!r}, not {FORMAT!r}")
    if signature.get("format_version", 0) > FORMAT_VERSION:
      raise ValueError(f"format_version {signature['format_version']} is newer than this "
                       f"deepflow reads ({FORMAT_VERSION})")
    for key in ("files", "input", "output"):
      if not isinstance(signature.get(key), dict):
        raise ValueError(f"no {key!r} section")
    return signature
  except (ValueError, UnicodeDecodeError, AttributeError) as e:
    raise ArtifactError(f"corrupted artifact {directory}: {SIGNATURE_FILE}: "
                        f"{_first_line(e)}") from e


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else type(error).__name__)[:300]


# ------------------------------------------------------------------------------------------------
# Input and output files (deepflow predict).
# ------------------------------------------------------------------------------------------------

def read_inputs(path: str) -> np.ndarray:
  """Examples from ``.npy`` or ``.json`` (a nested list: one example or a batch)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"input file not found: {path}")
  try:
    if path.endswith(".npy"):
      return np.load(path, allow_pickle=False)
    if path.endswith(".json"):
      with open(path) as f:
        return np.asarray(json.load(f))
  except ValueError as e:  # bad JSON, ragged lists, a pickled or damaged .npy
    raise ArtifactError(f"cannot read {path}: {_first_line(e)}") from e
  raise ArtifactError(f"input file {path} must end in .npy or .json")


def write_predictions(path: str, predictor: Predictor, outputs: np.ndarray) -> None:
  """``.npy``: the outputs as the model returns them (logits for a classifier); ``.json``: a list
  of the per-example records (class and probabilities for a classifier)."""
  if path.endswith(".npy"):
    np.save(path, outputs)
  elif path.endswith(".json"):
    with open(path, "w") as f:
      json.dump(predictor.records(outputs), f)
  else:
    raise ArtifactError(f"output file {path} must end in .npy or .json")
