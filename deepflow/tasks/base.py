"""What a task is: the objective that turns a model and a batch into gradients and metrics.

The loop knows nothing about classification, language modelling or GANs; it calls a task's
``init``, ``grads`` (inside the jitted train step; ``trained_grads`` differentiates only the
parameters that ``partition`` does not freeze), ``eval_outputs`` (inside the jitted eval step)
and ``summarize`` (on the host, over a whole split), and adds ``extra_metrics(step)`` to its logs.
A supervised task writes only ``loss`` and the per-example eval outputs; a task with several
players (GAN) overrides ``trained_grads`` itself. With ``privacy.enabled``, ``grads`` is DP-SGD
over the same ``loss`` applied to one example at a time (``private_grads``).
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from deepflow import models  # noqa: F401  (fills MODELS)
from deepflow.data.pipeline import MASK, DataSpec
from deepflow.models import lora as lora_lib, model_fields
from deepflow.optim import build_optimizer
from deepflow.optim.partition import Partition
from deepflow.pytree import cast_floats
from deepflow.registry import ConfigError, MODELS
from deepflow.regularizers import build_regularizers

PyTree = Any
Metrics = dict[str, jax.Array]


class Task:
  """Base task: a model from the registry, one optimizer, a differentiable scalar loss."""

  # The task section's options and their defaults (``task.<option>`` in a config); an instance's
  # ``options`` are the values its config gives them.
  OPTIONS: Mapping[str, Any] = {}
  # Whether ``loss`` of a batch is a mean of independent per-example terms, so that DP-SGD may
  # evaluate it one example at a time; False for objectives that compare examples (contrastive).
  PER_EXAMPLE_LOSS: bool = True

  def __init_subclass__(cls, **kwargs):
    # ``grads`` splits off the frozen parameters and fills their zeros; micro-batching calls
    # ``trained_grads`` directly, so an override of ``grads`` would be bypassed.
    super().__init_subclass__(**kwargs)
    if "grads" in vars(cls):
      raise TypeError(f"{cls.__name__} overrides Task.grads: override trained_grads instead "
                      f"(gradients w.r.t. the trained parameters; see deepflow.tasks.base)")

  def __init__(self, config: ConfigDict, spec: DataSpec):
    self.config = config
    self.options = {k: config.task.get(k, v) for k, v in self.OPTIONS.items()}
    self.spec = spec
    self.model = self.build_model(config.model, self.num_outputs())
    self.lora = lora_lib.from_config(config.model.lora)
    if self.lora and getattr(self.model, "scan_layers", False):
      raise ConfigError("model.lora adapts each layer's kernels; it does not support "
                        "model.scan_layers=True (kernels stacked over layers)")
    self.partition = Partition(config.optimizer, self.lora is not None)
    self.regularizer = build_regularizers(config.regularizers)
    self.privacy = self.build_privacy(config, spec)

  # -- building ----------------------------------------------------------------------------------

  def num_outputs(self) -> int:
    raise NotImplementedError

  @staticmethod
  def build_model(model_config: ConfigDict, num_outputs: int) -> nn.Module:
    fields = {k: tuple(v) if isinstance(v, list) else v
              for k, v in model_fields(model_config).items()}
    return MODELS.get(model_config.name)(num_outputs=num_outputs, **fields)

  def optimizer(self, total_steps: int) -> optax.GradientTransformation:
    return build_optimizer(self.config.optimizer, total_steps,
                           gradient=self.regularizer.gradient,
                           projection=self.regularizer.projection)

  def build_privacy(self, config: ConfigDict, spec: DataSpec):
    """DP-SGD from ``config.privacy`` (a ``deepflow.privacy.DpSgd``), or None when it is off.

    Refused where examples are not independent (batch statistics, a loss that compares them:
    ``PER_EXAMPLE_LOSS``) or where a task computes its own gradients (``trained_grads``
    overridden), since DP-SGD clips each example's gradient."""
    if not config.privacy.enabled:
      return None
    from deepflow import privacy  # dp-accounting loads only for private runs
    if type(self).trained_grads is not Task.trained_grads or not self.PER_EXAMPLE_LOSS:
      raise ConfigError(f"task {config.task.name!r} has no per-example loss to clip, so it does "
                        f"not support privacy.enabled")
    _, model_state = jax.eval_shape(self.init, jax.random.PRNGKey(0))
    if model_state:
      raise ConfigError(f"privacy.enabled needs per-example gradients, but model "
                        f"{config.model.name!r} keeps batch statistics ({', '.join(model_state)}), "
                        f"which mix examples; use a model with layer or group norm instead")
    return privacy.DpSgd.from_config(config, spec.train_size)

  def example_inputs(self) -> jax.Array:
    return jnp.zeros((1, *self.spec.input_shape), self.spec.input_dtype)

  def example_args(self) -> tuple[jax.Array, ...]:
    """The model's positional arguments for ``init``: one example batch of inputs (a GAN adds
    labels)."""
    return (self.example_inputs(),)

  def init(self, rng: jax.Array) -> tuple[PyTree, PyTree]:
    """(params, model_state): model state holds the non-trained collections (batch stats)."""
    params_rng, dropout_rng = jax.random.split(rng)
    variables = self.model.init({"params": params_rng, "dropout": dropout_rng},
                                *self.example_args(), train=False)
    variables = dict(variables)
    params = variables.pop("params")
    if self.lora:
      params = lora_lib.add_adapters(params, self.lora, jax.random.fold_in(params_rng, 1))
    return params, variables

  def model_params(self, params: PyTree) -> PyTree:
    """The parameters the model itself takes: with ``model.lora``, the adapters merged into
    their kernels (``deepflow.models.lora``); else ``params`` as they are."""
    return lora_lib.merge(params, self.lora) if self.lora else params

  # -- training ----------------------------------------------------------------------------------

  def apply(self, params: PyTree, model_state: PyTree, inputs: jax.Array, rng: jax.Array | None,
            *, train: bool, method: str | None = None, extra: tuple = ()
            ) -> tuple[jax.Array, PyTree]:
    """Runs the model (or its ``method``, with ``extra`` positional arguments after the inputs,
    e.g. a GAN's labels); in training returns the updated mutable collections too.

    Mixed precision (``train.compute_dtype='bfloat16'``): float params and inputs are cast to
    the compute dtype here, so the forward and backward passes run in it while the master
    params, the optimizer and the gradients (cast back by autodiff) stay float32; outputs come
    back as float32 for a numerically safe loss."""
    compute = self.compute_dtype
    params, inputs = cast_floats((self.model_params(params), inputs), compute)
    variables = {"params": params, **model_state}
    rngs = {"dropout": rng} if rng is not None else {}
    if train and model_state:
      out, model_state = self.model.apply(variables, inputs, *extra, train=True, rngs=rngs,
                                          method=method, mutable=list(model_state))
    else:
      out = self.model.apply(variables, inputs, *extra, train=train, rngs=rngs, method=method)
    return cast_floats(out, jnp.float32), model_state

  @property
  def compute_dtype(self):
    return jnp.dtype(self.config.train.compute_dtype)

  def loss(self, params: PyTree, model_state: PyTree, batch: Mapping[str, jax.Array],
           rng: jax.Array) -> tuple[jax.Array, tuple[Metrics, PyTree]]:
    """(scalar loss, (metrics, new model state)) for one training batch."""
    raise NotImplementedError

  def grads(self, params: PyTree, model_state: PyTree, batch: Mapping[str, jax.Array],
            rng: jax.Array) -> tuple[PyTree, PyTree, Metrics]:
    """Gradients of ``loss`` w.r.t. params (zero for frozen ones, which are not
    differentiated), the new model state and the batch's metrics."""
    trained, frozen = self.partition.split(params)
    grads, model_state, metrics = self.trained_grads(trained, frozen, model_state, batch, rng)
    return self.partition.fill(grads, frozen), model_state, metrics

  def trained_grads(self, trained: PyTree, frozen: PyTree, model_state: PyTree,
                    batch: Mapping[str, jax.Array], rng: jax.Array
                    ) -> tuple[PyTree, PyTree, Metrics]:
    """``grads`` w.r.t. the trained parameters only (``Partition.split``'s parts): the frozen
    ones are constants, so their weight gradients are never computed."""
    if self.privacy is not None:
      return self.private_grads(trained, frozen, model_state, batch, rng)
    if self.regularizer.batch is not None:  # label smoothing, mixup, ...: training batches only
      batch = self.regularizer.batch(batch, jax.random.fold_in(rng, 1), self.spec.num_classes)

    def trained_loss(trained):
      return self.regularized_loss(self.partition.merge(trained, frozen), model_state, batch, rng)
    (loss, (metrics, model_state)), grads = jax.value_and_grad(trained_loss, has_aux=True)(
        trained)
    return grads, model_state, {"loss": loss, **metrics}

  def private_grads(self, trained: PyTree, frozen: PyTree, model_state: PyTree,
                    batch: Mapping[str, jax.Array], rng: jax.Array
                    ) -> tuple[PyTree, PyTree, Metrics]:
    """DP-SGD (``privacy.enabled``): ``loss`` of each example on its own (vmapped), each gradient
    w.r.t. the trained parameters clipped, summed and noised by ``self.privacy`` (frozen
    parameters enter neither the clipping norm nor the noise). Parameter penalties depend on no
    example, so their gradient is added after the noise, unclipped and at no privacy cost."""
    if self.regularizer.batch is not None:  # per-example ones only (validate_config)
      batch = self.regularizer.batch(batch, jax.random.fold_in(rng, 1), self.spec.num_classes)
    merge = self.partition.merge

    def example_loss(t, example, key):
      example = dict(example)
      real = example.pop(MASK, 1.0)  # a Poisson batch's padding row: zero loss, zero gradient
      one = jax.tree.map(lambda x: x[None], example)  # a batch of one: the task's own loss
      loss, (metrics, _) = self.loss(merge(t, frozen), model_state, one, key)
      return real * loss, metrics

    grads, metrics = self.privacy.gradients(example_loss, trained, batch, rng)
    if self.regularizer.penalty is not None:
      penalty, grads = self._add_penalty_grads(grads, trained, frozen)
      metrics = {**metrics, "loss": metrics["loss"] + penalty, "penalty": penalty}
    return grads, model_state, metrics

  def _add_penalty_grads(self, grads: PyTree, trained: PyTree, frozen: PyTree
                         ) -> tuple[jax.Array, PyTree]:
    """(penalty, ``grads`` plus the penalty's gradient w.r.t. the trained parameters), for
    gradients taken apart from the loss (the penalty is not per example)."""
    penalty, penalty_grads = jax.value_and_grad(
        lambda t: self.regularizer.penalty(self.partition.merge(t, frozen)))(trained)
    return penalty, jax.tree.map(jnp.add, grads, penalty_grads)

  def regularized_loss(self, params: PyTree, model_state: PyTree,
                       batch: Mapping[str, jax.Array], rng: jax.Array
                       ) -> tuple[jax.Array, tuple[Metrics, PyTree]]:
    """``loss`` plus the configured parameter penalties (l1, l2), reported as ``penalty``."""
    loss, (metrics, model_state) = self.loss(params, model_state, batch, rng)
    if self.regularizer.penalty is None:
      return loss, (metrics, model_state)
    penalty = self.regularizer.penalty(params)
    return loss + penalty, ({**metrics, "penalty": penalty}, model_state)

  # -- evaluation --------------------------------------------------------------------------------

  def eval_outputs(self, params: PyTree, model_state: PyTree,
                   batch: Mapping[str, jax.Array]) -> Metrics:
    """Per-example values (shape (B,)) that ``summarize`` reduces over the whole split."""
    raise NotImplementedError

  def extra_metrics(self, step: int) -> dict[str, float]:
    """Host-side metrics that depend only on the step count, which the loop adds to every train
    log and evaluation: the privacy budget spent so far under DP-SGD, else none."""
    return self.privacy.metrics(step) if self.privacy is not None else {}

  def summarize(self, outputs: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Split-level metrics from the concatenated per-example outputs of real (unpadded) rows.
    The default: the mean of every output."""
    return {k: float(np.mean(v)) for k, v in outputs.items()}

  # -- generation (``deepflow sample``) ------------------------------------------------------------

  def sample(self, params: PyTree, model_state: PyTree, rng: jax.Array, num: int,
             **options: Any) -> dict[str, np.ndarray]:
    """``num`` draws from a trained generative model, as host arrays with a leading ``num`` axis
    (tokens and their ``text`` for a language model, images for a GAN). ``options`` are the ones
    the user gave (``prompt``, ``num_tokens``, ``temperature``, ``top_k``); a task refuses one it
    cannot use. Tasks that are not generative keep this refusal."""
    raise ConfigError(f"task {self.config.task.name!r} with model {self.config.model.name!r} is "
                      f"not generative; `deepflow sample` needs a language model or a GAN")
