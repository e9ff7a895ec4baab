"""Supervised objectives: classification (softmax cross-entropy) and regression (MSE)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepflow.data.pipeline import INPUTS, TARGETS
from deepflow.registry import ConfigError, TASKS
from deepflow.tasks.base import Task

GROUP = "group"  # the demographic attribute of a fairness dataset's examples (bundled:fair)


@TASKS.register("classification")
class Classification(Task):
  """Softmax cross-entropy over integer labels (or soft targets, from label smoothing or mixup);
  accuracy over the whole eval split, and for two classes precision, recall, F1 and ROC-AUC of
  class 1 (the positive class).

  ``class_weights``: None, 'balanced' (``n / (C * n_c)`` from the train split's label counts, as
  scikit-learn defines it) or one weight per class; the training loss is the batch mean of the
  weighted per-example losses (eval losses stay unweighted).

  ``fairness``: when the data carries a ``group`` feature and there are two classes, eval adds
  ``deepflow.analysis.group_metrics`` (per-group rates and fairness gaps, ``fairness/...``).
  None reports them whenever it can, True requires them (an error on data without ``group``),
  False turns them off. ``group_weights``: None, or a table of loss weights, row ``g`` holding
  one weight per class for group ``g``: e.g. ``reweighing_table``'s (Kamiran & Calders), which
  makes label and group independent in the weighted train split, a fairness mitigation."""

  OPTIONS = {"class_weights": None, "fairness": None, "group_weights": None}

  def __init__(self, config, spec):
    super().__init__(config, spec)
    self.class_weights = self._class_weights(self.options["class_weights"])
    self.fairness = self.options["fairness"]
    if self.fairness not in (None, True, False):
      raise ConfigError(f"task.fairness must be None (when the data has a group), True or False, "
                        f"got {self.fairness!r}")
    if self.fairness and self.spec.num_classes != 2:
      raise ConfigError(f"task.fairness=True needs a binary classification dataset; "
                        f"{config.data.source} has {self.spec.num_classes} classes")
    self.group_weights = self._group_weights(self.options["group_weights"])

  def num_outputs(self) -> int:
    if not self.spec.num_classes:
      raise ConfigError("task 'classification' needs a dataset with class labels "
                        "(a ClassLabel target); use task.name='regression' for real targets")
    return self.spec.num_classes

  def _class_weights(self, option) -> jnp.ndarray | None:
    n = self.spec.num_classes
    if option is None:
      return None
    if option == "balanced":
      if self.spec.class_counts is None:
        raise ConfigError("task.class_weights='balanced' needs the train split in memory "
                          "(data.cache=True) to count its labels")
      counts = np.asarray(self.spec.class_counts, np.float64)
      weights = np.where(counts > 0, counts.sum() / (n * np.maximum(counts, 1)), 0.0)
    elif isinstance(option, (list, tuple)) and len(option) == n and all(
        isinstance(w, (int, float)) and w >= 0 for w in option):
      weights = np.asarray(option, np.float64)
    else:
      raise ConfigError(f"task.class_weights must be None, 'balanced' or {n} numbers >= 0, "
                        f"got {option!r}")
    return jnp.asarray(weights, jnp.float32)

  def _group_weights(self, option) -> jnp.ndarray | None:
    if option is None:
      return None
    table = np.asarray(option, dtype=object)
    n = self.spec.num_classes
    if not (table.ndim == 2 and table.shape[1] == n and all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in table.flat)):
      raise ConfigError(f"task.group_weights must be a table with one row per group and {n} "
                        f"numbers >= 0 per row (one per class), got {option!r}")
    return jnp.asarray(table.astype(np.float64), jnp.float32)

  def _check_group(self, batch) -> None:
    """Data without a ``group`` feature cannot give what the options ask for: say so at trace
    time of the first step, before any training."""
    if GROUP in batch:
      return
    for option, value in (("fairness", self.fairness), ("group_weights", self.group_weights)):
      if value is not None and value is not False:
        raise ConfigError(f"task.{option} needs a dataset whose examples carry a '{GROUP}' "
                          f"attribute (e.g. bundled:fair); {self.config.data.source} has none")

  def loss(self, params, model_state, batch, rng):
    self._check_group(batch)
    logits, model_state = self.apply(params, model_state, batch[INPUTS], rng, train=True)
    per_example, labels = self.hard_loss(logits, batch)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return per_example.mean(), ({"accuracy": accuracy}, model_state)

  def hard_loss(self, logits, batch) -> tuple[jax.Array, jax.Array]:
    """(per-example weighted cross-entropy against the batch's labels or soft targets, the
    integer labels): the training objective before the batch mean."""
    targets = batch[TARGETS]
    if jnp.issubdtype(targets.dtype, jnp.floating) and targets.ndim == logits.ndim:
      per_example = optax.softmax_cross_entropy(logits, targets)  # soft targets
      weights = None if self.class_weights is None else targets @ self.class_weights
      labels = jnp.argmax(targets, -1)
    else:
      labels = targets.astype(jnp.int32)
      per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      weights = None if self.class_weights is None else self.class_weights[labels]
    if weights is not None:
      per_example = per_example * weights
    if self.group_weights is not None:  # fairness reweighing: one weight per (group, label)
      per_example = per_example * self.group_weights[batch[GROUP].astype(jnp.int32), labels]
    return per_example, labels

  def eval_outputs(self, params, model_state, batch):
    self._check_group(batch)
    logits, _ = self.apply(params, model_state, batch[INPUTS], None, train=False)
    labels = batch[TARGETS].astype(jnp.int32)
    outputs = {"loss": optax.softmax_cross_entropy_with_integer_labels(logits, labels),
               "accuracy": (jnp.argmax(logits, -1) == labels).astype(jnp.float32)}
    if self.spec.num_classes == 2:  # per-example pieces of the split-level binary metrics
      outputs["positive_probability"] = jax.nn.softmax(logits.astype(jnp.float32), -1)[:, 1]
      outputs["label"] = labels.astype(jnp.float32)
      if GROUP in batch and self.fairness is not False:  # pieces of the group metrics
        outputs["prediction"] = jnp.argmax(logits, -1).astype(jnp.int32)
        outputs[GROUP] = batch[GROUP].astype(jnp.int32)
    return outputs

  def summarize(self, outputs):
    outputs = dict(outputs)
    probability, labels = outputs.pop("positive_probability", None), outputs.pop("label", None)
    prediction, groups = outputs.pop("prediction", None), outputs.pop(GROUP, None)
    metrics = super().summarize(outputs)
    if probability is not None:
      metrics.update(binary_metrics(labels, probability))
    if groups is not None:
      from deepflow.analysis.fairness import group_metrics
      names = self.spec.metadata.get("group_names")  # so an absent group shows up, as NaN
      metrics.update(group_metrics(prediction, labels.astype(np.int64), groups,
                                   num_groups=len(names) if names else None))
    return metrics


def reweighing_table(labels, groups, num_classes: int) -> list[list[float]]:
  """``task.group_weights`` for reweighing (Kamiran & Calders, 2012): row ``g``, column ``y`` is
  ``P(g) P(y) / P(g, y)`` over the given (train split's) labels and groups; 1.0 for a cell with
  no examples (it weighs nothing)."""
  from deepflow.analysis.fairness import reweighing_weights
  labels, groups = np.asarray(labels).astype(np.int64), np.asarray(groups).astype(np.int64)
  weights = reweighing_weights(labels, groups)
  table = np.ones((int(groups.max()) + 1, num_classes))
  table[groups, labels] = weights  # every example of a cell has the same weight
  return table.tolist()


def binary_metrics(labels: np.ndarray, probability: np.ndarray) -> dict[str, float]:
  """Precision, recall and F1 of class 1 at probability > 0.5 (the argmax), and ROC-AUC (NaN
  when the split holds one class only: AUC is undefined there)."""
  from sklearn import metrics
  labels = np.asarray(labels).astype(int)
  predicted = (np.asarray(probability) > 0.5).astype(int)
  precision, recall, f1, _ = metrics.precision_recall_fscore_support(
      labels, predicted, average="binary", zero_division=0)
  auc = (float(metrics.roc_auc_score(labels, probability)) if len(np.unique(labels)) == 2
         else float("nan"))
  return {"precision": float(precision), "recall": float(recall), "f1": float(f1), "auc": auc}


@TASKS.register("regression")
class Regression(Task):
  """Mean squared error on real-valued targets; reports MSE, RMSE and MAE."""

  def num_outputs(self) -> int:
    return int(np.prod(self.spec.target_shape)) or 1

  def predict(self, params, model_state, inputs, rng, train):
    out, model_state = self.apply(params, model_state, inputs, rng, train=train)
    return out.reshape(out.shape[0], -1), model_state

  def loss(self, params, model_state, batch, rng):
    pred, model_state = self.predict(params, model_state, batch[INPUTS], rng, True)
    target = batch[TARGETS].reshape(pred.shape).astype(pred.dtype)
    loss = jnp.mean((pred - target) ** 2)
    return loss, ({"mae": jnp.mean(jnp.abs(pred - target))}, model_state)

  def eval_outputs(self, params, model_state, batch):
    pred, _ = self.predict(params, model_state, batch[INPUTS], None, False)
    err = pred - batch[TARGETS].reshape(pred.shape).astype(pred.dtype)
    return {"mse": jnp.mean(err ** 2, axis=-1), "mae": jnp.mean(jnp.abs(err), axis=-1)}

  def summarize(self, outputs):
    metrics = super().summarize(outputs)
    metrics["rmse"] = float(np.sqrt(metrics["mse"]))
    return metrics



