"""What an experiment assembles around a task's objective for its update step: the optimizer,
the trained/frozen partition, LoRA's adapters, DP-SGD and the step's regularizers.

A ``Task`` is only the objective (its model, ``init``, ``loss``, eval outputs, summaries,
sampling); ``build_update`` reads the config's other sections and returns an ``Update``, which
``train.step`` turns into the train and eval steps (``gradient_fn`` shows how its parts compose).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import optax

from deepflow.models import lora as lora_lib
from deepflow.optim import build_optimizer
from deepflow.optim.optimizers import selectors as optimizer_selectors
from deepflow.optim.partition import Partition
from deepflow.pytree import flatten
from deepflow.registry import ConfigError
from deepflow.regularizers import Regularizer, build_regularizers
from deepflow.tasks.base import Task

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Update:
  """One run's update around ``task``: ``tx`` (the optimizer, restricted by ``partition`` to the
  trained parameters), ``lora`` (adapters added at init and merged before every use; None when
  off), ``privacy`` (a ``deepflow.privacy.DpSgd``, or None), ``regularizer`` (its batch changes
  and penalties; its gradient and projection hooks are in ``tx``), the number of
  ``microbatches`` and whether batch statistics stay as loaded (``freeze_batch_stats``)."""
  task: Task
  tx: optax.GradientTransformation
  partition: Partition
  regularizer: Regularizer
  lora: lora_lib.LoraConfig | None = None
  privacy: Any = None
  microbatches: int = 1
  freeze_batch_stats: bool = False

  def init(self, rng: jax.Array) -> tuple[PyTree, PyTree]:
    """(params, model_state) of the task's model, with LoRA's adapters beside their kernels."""
    params, model_state = self.task.init(rng)
    if self.lora:
      params_rng, _ = jax.random.split(rng)
      params = lora_lib.add_adapters(params, self.lora, jax.random.fold_in(params_rng, 1))
    return params, model_state

  def model_params(self, params: PyTree) -> PyTree:
    """The parameters the model itself takes: with ``model.lora``, the adapters merged into their
    kernels (``deepflow.models.lora``); else ``params`` as they are."""
    return lora_lib.merge(params, self.lora) if self.lora else params

  def extra_metrics(self, step: int) -> dict[str, float]:
    """Host-side metrics that depend only on the step count, which the loop adds to every train
    log and evaluation: the privacy budget spent so far under DP-SGD, else none."""
    return self.privacy.metrics(step) if self.privacy is not None else {}


def build_update(config: Any, task: Task, total_steps: int) -> Update:
  """The update that ``config`` describes around ``task`` (``optimizer``, ``model.lora``,
  ``privacy``, ``regularizers``, ``train.microbatches``), its options checked."""
  lora = lora_lib.from_config(config.model.lora)
  if lora and getattr(task.model, "scan_layers", False):
    raise ConfigError("model.lora adapts each layer's kernels; it does not support "
                      "model.scan_layers=True (kernels stacked over layers)")
  regularizer = build_regularizers(config.regularizers)
  if regularizer.batch is not None and task.NO_BATCH_REGULARIZERS is not None:
    raise ConfigError(f"task {config.task.name!r} takes no batch regularizers (label smoothing, "
                      f"mixup, cutmix){task.NO_BATCH_REGULARIZERS}")
  partition = Partition(config.optimizer, lora is not None)
  tx = partition.wrap(optimizer(config.optimizer, total_steps, regularizer,
                                task.learning_rates()))
  return Update(task, tx, partition, regularizer, lora, _privacy(config, task),
                config.train.microbatches, config.optimizer.freeze_batch_stats)


def optimizer(c: Any, total_steps: int, regularizer: Regularizer,
              rates: dict[str, float] | None = None) -> optax.GradientTransformation:
  """The ``optimizer`` section's chain with the regularizers' gradient and projection hooks; with
  ``rates`` (a task's parameter groups, e.g. a GAN's players) one chain per top-level sub-tree
  at its own learning rate, by ``optax.multi_transform`` (rate 0: the group is frozen)."""
  def build(section: Any) -> optax.GradientTransformation:
    return build_optimizer(section, total_steps, gradient=regularizer.gradient,
                           projection=regularizer.projection)

  def chain(learning_rate: float) -> optax.GradientTransformation:
    if learning_rate == 0:  # frozen; also spares schedules that divide by the rate
      return optax.set_to_zero()
    section = c
    if learning_rate != c.learning_rate:
      section = ml_collections.ConfigDict(c.to_dict())
      section.learning_rate = learning_rate
    return build(section)
  if rates is None:
    return build(c)
  return optax.multi_transform({group: chain(rate) for group, rate in rates.items()},
                               {group: group for group in rates})


def check_selectors(update: Update, config: Any, params: PyTree) -> None:
  """A regex of the config that selects no parameter of ``params`` (the whole model's) is a
  one-line ConfigError; so is a freeze that leaves nothing to train."""
  update.partition.check(params)
  names = list(flatten(params))
  for selector in (*update.regularizer.selectors, *optimizer_selectors(config.optimizer)):
    selector.check(names)


def _privacy(config: Any, task: Task):
  """DP-SGD from ``config.privacy`` (a ``deepflow.privacy.DpSgd``), or None when it is off.

  Refused where examples are not independent (batch statistics, a loss that compares them:
  ``Task.PER_EXAMPLE_LOSS``) or where a task computes its own gradients (``trained_grads``),
  since DP-SGD clips each example's gradient."""
  if not config.privacy.enabled:
    return None
  from deepflow import privacy  # dp-accounting loads only for private runs
  if task.differentiates_itself or not task.PER_EXAMPLE_LOSS:
    raise ConfigError(f"task {config.task.name!r} has no per-example loss to clip, so it does "
                      f"not support privacy.enabled")
  _, model_state = jax.eval_shape(task.init, jax.random.PRNGKey(0))
  if model_state:
    raise ConfigError(f"privacy.enabled needs per-example gradients, but model "
                      f"{config.model.name!r} keeps batch statistics ({', '.join(model_state)}), "
                      f"which mix examples; use a model with layer or group norm instead")
  return privacy.DpSgd.from_config(config, task.spec.train_size)
