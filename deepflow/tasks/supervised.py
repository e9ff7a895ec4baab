"""Supervised objectives: classification (softmax cross-entropy) and regression (MSE)."""
from __future__ import annotations


import jax.numpy as jnp
import numpy as np
import optax

from deepflow.data.pipeline import INPUTS, TARGETS
from deepflow.registry import ConfigError, TASKS
from deepflow.tasks.base import Task


@TASKS.register("classification")
class Classification(Task):
  """Softmax cross-entropy over integer labels; accuracy over the whole eval split."""

  def num_outputs(self) -> int:
    if not self.spec.num_classes:
      raise ConfigError("task 'classification' needs a dataset with class labels "
                        "(a ClassLabel target); use task.name='regression' for real targets")
    return self.spec.num_classes

  def loss(self, params, model_state, batch, rng):
    logits, model_state = self.apply(params, model_state, batch[INPUTS], rng, train=True)
    labels = batch[TARGETS].astype(jnp.int32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, ({"accuracy": accuracy}, model_state)

  def eval_outputs(self, params, model_state, batch):
    logits, _ = self.apply(params, model_state, batch[INPUTS], None, train=False)
    labels = batch[TARGETS].astype(jnp.int32)
    return {"loss": optax.softmax_cross_entropy_with_integer_labels(logits, labels),
            "accuracy": (jnp.argmax(logits, -1) == labels).astype(jnp.float32)}


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



