"""Running an ONNX artifact (``deepflow export --format onnx``) with ONNX Runtime and numpy only.

``deepflow.predict`` loads an artifact whose ``signature.json`` says ``"runtime": "onnxruntime"``
through ``session`` below and never imports JAX: a fresh process predicts in the time
onnxruntime and numpy take to import (``benchmarks/edge.py``). Needs ``deepflow[edge]``.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np

from deepflow.registry import ConfigError, first_line

RUNTIME, ONNX_FILE = "onnxruntime", "model.onnx"


def session(directory: str) -> Callable[[np.ndarray], np.ndarray]:
  """``run(inputs) -> outputs`` over the artifact's ``model.onnx`` (CPU execution provider)."""
  try:
    import onnxruntime
  except ImportError as e:
    raise ConfigError("an ONNX artifact needs onnxruntime: pip install 'deepflow[edge]'") from e
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3  # its shape-merging warnings are about intermediate names
  try:
    sess = onnxruntime.InferenceSession(os.path.join(directory, ONNX_FILE), options,
                                        providers=["CPUExecutionProvider"])
  except Exception as e:  # checksums matched, so the file was written broken
    raise ConfigError(f"corrupted artifact {directory}: {ONNX_FILE}: {first_line(e)}") from e
  name = sess.get_inputs()[0].name
  return lambda x: sess.run(None, {name: x})[0]
