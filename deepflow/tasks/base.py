"""What a task is: the objective that turns a model and a batch into gradients and metrics.

The loop knows nothing about classification, language modelling or GANs; it calls a task's
``init``, ``grads`` (inside the jitted train step), ``eval_outputs`` (inside the jitted eval step)
and ``summarize`` (on the host, over a whole split). A supervised task writes only ``loss`` and
the per-example eval outputs; a task with several players (GAN) overrides ``grads`` itself.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepflow.config import ConfigDict
from deepflow.data.pipeline import DataSpec
from deepflow.optim import build_optimizer
from deepflow.registry import MODELS

PyTree = Any
Metrics = dict[str, jax.Array]


class Task:
  """Base task: a model from the registry, one optimizer, a differentiable scalar loss."""

  OPTIONS: Mapping[str, Any] = {}

  @classmethod
  def options(cls) -> dict[str, Any]:
    """The task section's options and their defaults (``task.<option>`` in a config)."""
    return dict(cls.OPTIONS)

  def __init__(self, config: ConfigDict, spec: DataSpec):
    self.config = config
    self.options_ = {k: config.task.get(k, v) for k, v in self.options().items()}
    self.spec = spec
    self.model = self.build_model(config.model, self.num_outputs())

  # -- building ----------------------------------------------------------------------------------

  def num_outputs(self) -> int:
    raise NotImplementedError

  @staticmethod
  def build_model(model_config: ConfigDict, num_outputs: int) -> nn.Module:
    fields = {k: v for k, v in model_config.items() if k != "name"}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return MODELS.get(model_config.name)(num_outputs=num_outputs, **fields)

  def optimizer(self, total_steps: int) -> optax.GradientTransformation:
    return build_optimizer(self.config.optimizer, total_steps)

  def example_inputs(self) -> jax.Array:
    return jnp.zeros((1, *self.spec.input_shape), self.spec.input_dtype)

  def init(self, rng: jax.Array) -> tuple[PyTree, PyTree]:
    """(params, model_state): model state holds the non-trained collections (batch stats)."""
    params_rng, dropout_rng = jax.random.split(rng)
    variables = self.model.init({"params": params_rng, "dropout": dropout_rng},
                                self.example_inputs(), train=False)
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables

  # -- training ----------------------------------------------------------------------------------

  def apply(self, params: PyTree, model_state: PyTree, inputs: jax.Array, rng: jax.Array | None,
            *, train: bool) -> tuple[jax.Array, PyTree]:
    """Runs the model; in training returns the updated mutable collections too."""
    variables = {"params": params, **model_state}
    rngs = {"dropout": rng} if rng is not None else {}
    if train and model_state:
      return self.model.apply(variables, inputs, train=True, rngs=rngs, mutable=list(model_state))
    return self.model.apply(variables, inputs, train=train, rngs=rngs), model_state

  def loss(self, params: PyTree, model_state: PyTree, batch: Mapping[str, jax.Array],
           rng: jax.Array) -> tuple[jax.Array, tuple[Metrics, PyTree]]:
    """(scalar loss, (metrics, new model state)) for one training batch."""
    raise NotImplementedError

  def grads(self, params: PyTree, model_state: PyTree, batch: Mapping[str, jax.Array],
            rng: jax.Array) -> tuple[PyTree, PyTree, Metrics]:
    """Gradients of ``loss`` w.r.t. params, the new model state and the batch's metrics."""
    (loss, (metrics, model_state)), grads = jax.value_and_grad(self.loss, has_aux=True)(
        params, model_state, batch, rng)
    return grads, model_state, {"loss": loss, **metrics}

  # -- evaluation --------------------------------------------------------------------------------

  def eval_outputs(self, params: PyTree, model_state: PyTree,
                   batch: Mapping[str, jax.Array]) -> Metrics:
    """Per-example values (shape (B,)) that ``summarize`` reduces over the whole split."""
    raise NotImplementedError

  def summarize(self, outputs: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Split-level metrics from the concatenated per-example outputs of real (unpadded) rows.
    The default: the mean of every output."""
    return {k: float(np.mean(v)) for k, v in outputs.items()}

