"""Running an inference artifact: what ``deepflow predict`` does, with JAX and numpy only (an
ONNX artifact, ``deepflow export --format onnx``: ONNX Runtime and numpy, ``deepflow.onnx_runtime``).

``deepflow export`` (``deepflow.export``) writes an artifact; this module reads one. It imports
nothing of the training stack (no optax, orbax, grain, flax or TFDS): ``predict`` starts in the
time JAX takes to import. The files:

  model.bin       the inference function (raw inputs -> model outputs: the fitted eval-time
                  preprocessing, then the model in eval mode) as serialized StableHLO from
                  ``jax.export``, with a symbolic batch dimension, lowered for cpu, cuda and tpu
  weights.npz     that function's first argument: parameters, model state and preprocessing
                  statistics, keyed by '/'-joined path ('params/Dense_0/kernel',
                  'preprocessing/0/mean', ...)
  signature.json  input shape and dtype, what the outputs mean (class names), the preprocessing
                  (and ``host_preprocessing``: per-example image steps such as ``center_crop``
                  that run before the artifact), where the model came from, and the SHA-256
                  of both files (a corrupted artifact is refused with one line instead of
                  computing garbage)

By hand: ``jax.export.deserialize(open('model.bin', 'rb').read()).call(
dict(numpy.load('weights.npz')), inputs)``.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

import numpy as np

from deepflow import onnx_runtime
from deepflow.registry import ConfigError, first_line

MODEL_FILE, WEIGHTS_FILE, SIGNATURE_FILE = "model.bin", "weights.npz", "signature.json"
FORMAT, FORMAT_VERSION = "deepflow-inference", 1


class ArtifactError(ConfigError):
  """A missing or corrupted artifact, or inputs it does not accept: one line, no traceback."""


def sha256(path: str) -> str:
  """The hex SHA-256 of a file (the checksums in ``signature.json``)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


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
      if sha256(path) != expected:
        raise ArtifactError(f"corrupted artifact {directory}: {name} does not match its "
                            f"checksum in {SIGNATURE_FILE}; export it again")
    if self.signature.get("runtime") == onnx_runtime.RUNTIME:  # deepflow export --format onnx
      self._run = onnx_runtime.session(directory)
    else:
      self._run = _jax_function(directory)
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
      return np.asarray(self._run(x))
    except (ValueError, TypeError) as e:  # e.g. exported for platforms this machine lacks
      raise ArtifactError(f"cannot run the artifact here: {first_line(e)}") from e

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


def _jax_function(directory: str) -> Callable[[np.ndarray], Any]:
  """``model.bin`` called on ``weights.npz`` and the inputs. JAX is imported here, not at the
  top of the module: an ONNX artifact is predicted without it."""
  import jax
  try:
    with open(os.path.join(directory, MODEL_FILE), "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    with np.load(os.path.join(directory, WEIGHTS_FILE), allow_pickle=False) as f:
      weights = {k: f[k] for k in f.files}
  except Exception as e:  # checksums matched, so the files were written broken
    raise ArtifactError(f"corrupted artifact {directory}: {type(e).__name__}: "
                        f"{first_line(e)}") from e
  return lambda x: exported.call(weights, x)


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
                        f"{first_line(e)}") from e


# Input and output files of ``deepflow predict``.

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
    raise ArtifactError(f"cannot read {path}: {first_line(e)}") from e
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
