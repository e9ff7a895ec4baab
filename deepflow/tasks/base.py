"""What a task is: the objective, a model and a loss that turn a batch into metrics.

The loop knows nothing about classification, language modelling or GANs; the train step
differentiates a task's ``loss`` (``deepflow.train.step``), the eval step calls its
``eval_outputs`` and the host its ``summarize`` (over a whole split); ``deepflow sample`` calls
its ``sample``. Everything around the objective (optimizer, frozen parameters, LoRA, DP-SGD,
regularizers) the experiment assembles (``deepflow.train.update``): a task always sees the
parameters its model takes. A supervised task writes only ``loss`` and the per-example eval
outputs; a task with several players (GAN) computes its gradients itself (``trained_grads``).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from deepflow import models  # noqa: F401  (fills MODELS)
from deepflow.data.pipeline import DataSpec
from deepflow.models import model_fields
from deepflow.pytree import cast_floats
from deepflow.registry import ConfigError, MODELS

PyTree = Any
Metrics = dict[str, jax.Array]


class Task:
  """Base task: a model from the registry and a differentiable scalar loss."""

  # The task section's options and their defaults (``task.<option>`` in a config); an instance's
  # ``options`` are the values its config gives them.
  OPTIONS: Mapping[str, Any] = {}
  # Whether ``loss`` of a batch is a mean of independent per-example terms, so that DP-SGD may
  # evaluate it one example at a time; False for objectives that compare examples (contrastive).
  PER_EXAMPLE_LOSS: bool = True
  # Why the task refuses batch regularizers (label smoothing, mixup, ...), after that refusal's
  # first words; None: it takes them.
  NO_BATCH_REGULARIZERS: str | None = None

  def __init_subclass__(cls, **kwargs):
    # The train step composes the gradient around ``loss`` or ``trained_grads``
    # (``deepflow.train.step.gradient_fn``); a ``grads`` method would never be called.
    super().__init_subclass__(**kwargs)
    if "grads" in vars(cls):
      raise TypeError(f"{cls.__name__} defines grads, which the train step never calls: "
                      f"override trained_grads instead (gradients w.r.t. the trained "
                      f"parameters; see deepflow.tasks.base)")

  def __init__(self, config: ConfigDict, spec: DataSpec):
    self.config = config
    self.options = {k: config.task.get(k, v) for k, v in self.OPTIONS.items()}
    self.spec = spec
    self.model = self.build_model(config.model, self.num_outputs())
    self.compute_dtype = jnp.dtype(config.train.compute_dtype)

  # -- building ----------------------------------------------------------------------------------

  def num_outputs(self) -> int:
    raise NotImplementedError

  @staticmethod
  def build_model(model_config: ConfigDict, num_outputs: int) -> nn.Module:
    fields = {k: tuple(v) if isinstance(v, list) else v
              for k, v in model_fields(model_config).items()}
    return MODELS.get(model_config.name)(num_outputs=num_outputs, **fields)

  def open_runs(self, reopen: Callable[[str], Any]) -> None:
    """Called once by the experiment that built the task, with its one reader of finished runs
    (``Experiment.from_workdir``: tasks do not import train/); a task that reads another run (a
    distillation teacher) opens it here. The default reads none."""

  def learning_rates(self) -> dict[str, float] | None:
    """Parameter groups (top-level sub-trees) that the experiment gives optimizers of their own,
    with their learning rates (0 freezes one), e.g. a GAN's two players; None: one optimizer."""
    return None

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
    return params, variables

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
    params, inputs = cast_floats((params, inputs), self.compute_dtype)
    variables = {"params": params, **model_state}
    rngs = {"dropout": rng} if rng is not None else {}
    if train and model_state:
      out, model_state = self.model.apply(variables, inputs, *extra, train=True, rngs=rngs,
                                          method=method, mutable=list(model_state))
    else:
      out = self.model.apply(variables, inputs, *extra, train=train, rngs=rngs, method=method)
    return cast_floats(out, jnp.float32), model_state

  def loss(self, params: PyTree, model_state: PyTree, batch: Mapping[str, jax.Array],
           rng: jax.Array) -> tuple[jax.Array, tuple[Metrics, PyTree]]:
    """(scalar loss, (metrics, new model state)) for one training batch."""
    raise NotImplementedError

  def trained_grads(self, trained: PyTree, params_of: Callable[[PyTree], PyTree],
                    model_state: PyTree, batch: Mapping[str, jax.Array], rng: jax.Array
                    ) -> tuple[PyTree, PyTree, Metrics]:
    """Optional, for a task whose gradient is not that of one scalar ``loss`` (a GAN's players
    each take their own): (gradients w.r.t. ``trained``, the new model state, metrics with
    ``loss``). ``params_of(trained)`` gives the model's parameters (the frozen ones and LoRA's
    merge put in by ``deepflow.train.gradients``); differentiate through it."""
    raise NotImplementedError

  @property
  def differentiates_itself(self) -> bool:
    """Whether this task overrides ``trained_grads`` (then no DP-SGD: it clips ``loss``'s)."""
    return type(self).trained_grads is not Task.trained_grads

  # -- evaluation --------------------------------------------------------------------------------

  def eval_outputs(self, params: PyTree, model_state: PyTree,
                   batch: Mapping[str, jax.Array]) -> Metrics:
    """Per-example values (shape (B,)) that ``summarize`` reduces over the whole split."""
    raise NotImplementedError

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
