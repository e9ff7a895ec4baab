"""Feature attributions of a trained run: what ``deepflow explain --workdir DIR`` does.

``explain(workdir, method, num_examples)`` restores a checkpoint of the run (by default its
result: see ``deepflow.train.experiment``), takes the first ``num_examples`` examples of a split
as the model sees them (after ``data.transforms``), and attributes the predicted class (or the
true one) with a method registered in ``deepflow.analysis.attributions.METHODS``. It writes ``DIR/explain/<method>.png`` (each input
above its signed heatmap) and ``DIR/explain/<method>.npz`` (``inputs``, ``attributions``,
``labels``, ``predictions``, ``targets``: the attributed classes) and returns the same arrays.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from deepflow.analysis import attributions as attributions_lib
from deepflow.data.pipeline import INPUTS, MASK, TARGETS
from deepflow.registry import ConfigError
from deepflow.train.experiment import RunSource

TARGET_CLASSES = ("predicted", "label")


@dataclasses.dataclass(frozen=True)
class Explanation:
  """One method's attributions of ``num_examples`` examples, and where they were written."""
  method: str
  split: str
  step: int
  inputs: np.ndarray
  attributions: np.ndarray
  labels: np.ndarray
  predictions: np.ndarray
  targets: np.ndarray
  png: str
  npz: str


def parse_options(items: Iterable[str]) -> dict[str, Any]:
  """``['steps=100', "baseline='mean'"]`` -> method options (values parsed as config values)."""
  from deepflow.config import parse_value
  options = {}
  for item in items:
    key, sep, raw = item.partition("=")
    if not sep or not key:
      raise ConfigError(f"method option {item!r} is not KEY=VALUE")
    options[key.strip()] = parse_value(raw)
  return options


def first_examples(pipeline, split: str, count: int) -> dict[str, np.ndarray]:
  """The first ``count`` examples of ``split`` (fewer if it is smaller), preprocessed."""
  chunks, have = [], 0
  for batch in pipeline.eval_batches(split):
    real = batch[MASK] > 0
    chunks.append({k: np.asarray(v)[real] for k, v in batch.items() if k != MASK})
    have += int(real.sum())
    if have >= count:
      break
  return {k: np.concatenate([c[k] for c in chunks])[:count] for k in chunks[0]}


def explain(run: RunSource | str, method: str = "integrated_gradients", num_examples: int = 16,
            *, split: str | None = None, target: str = "predicted",
            options: Mapping[str, Any] | None = None) -> Explanation:
  """Attributions of a checkpoint of ``run`` (a workdir, or a ``RunSource``: its config
  overrides and which checkpoint; see the module docstring).

  ``target``: attribute the model's 'predicted' class or the true 'label'. ``options`` go to
  the method (e.g. ``steps`` for integrated gradients, ``patch`` for occlusion). A workdir with
  no checkpoint is a ``FileNotFoundError``; a bad method, option or target a ``ConfigError``.
  """
  options = dict(options or {})
  known = attributions_lib.method_options(method)  # unknown method: ConfigError listing them
  unknown = sorted(set(options) - set(known))
  if unknown:  # before the (slow) restore: a typo should fail fast
    raise ConfigError(f"unknown option(s) {', '.join(map(repr, unknown))} for attribution method "
                      f"{method!r}; known: {', '.join(known) or '(none)'}")
  if target not in TARGET_CLASSES:
    raise ConfigError(f"target must be one of {', '.join(TARGET_CLASSES)}, got {target!r}")
  if not isinstance(num_examples, int) or num_examples < 1:
    raise ConfigError(f"num_examples must be a positive integer, got {num_examples!r}")
  source = RunSource.of(run)
  exp, state, step, _ = source.open()
  config = exp.config
  if not exp.task.spec.num_classes:
    raise ConfigError(f"deepflow explain attributes a class score; task "
                      f"{config.task.name!r} on {config.data.source} has no classes")
  split = split or config.data.eval_split
  batch = first_examples(exp.pipeline, split, num_examples)
  inputs, labels = batch[INPUTS], batch[TARGETS].astype(np.int32)
  task = exp.task

  def attribute(params, model_state, x, targets):
    # The parameters are arguments, not constants baked into the program (see attributions).
    params = exp.model_params(params)
    logits = lambda v: task.apply(params, model_state, v, None, train=False)[0]  # noqa: E731
    predictions = jnp.argmax(logits(x), -1)
    classes = predictions if targets is None else targets
    return attributions_lib.attribute(method, logits, x, classes, **options), predictions, classes

  run = jax.jit(attribute)
  values, predictions, classes = jax.device_get(run(
      state.params, state.model_state, inputs, labels if target == "label" else None))

  directory = os.path.join(source.workdir, "explain")
  os.makedirs(directory, exist_ok=True)
  npz = os.path.join(directory, f"{method}.npz")
  arrays = dict(inputs=np.asarray(inputs, np.float32), attributions=np.asarray(values, np.float32),
                labels=labels, predictions=np.asarray(predictions, np.int32),
                targets=np.asarray(classes, np.int32))
  np.savez(npz, **arrays)
  from deepflow.analysis.plots import save_attribution_grid
  png = save_attribution_grid(
      os.path.join(directory, f"{method}.png"), arrays["inputs"], arrays["attributions"],
      labels=[f"y={y} p={p}" for y, p in zip(labels, arrays["predictions"])],
      title=f"{method} of the {target} class, {split} split, step {step}")
  return Explanation(method, split, int(step), png=png, npz=npz, **arrays)
