"""Knowledge distillation (Hinton et al., 2015): a classifier (the student) trained on its labels
and on a trained teacher's softened outputs.

``task.teacher`` is any deepflow run directory, reopened through ``Experiment.from_workdir``,
which the experiment hands the task (``Task.open_runs``: tasks do not import train/). The run
brings its own config, so its own model: the teacher may have another architecture than the
student. Its parameters enter the train step as constants, so the teacher is evaluated inside
the same jitted step on the same batch (no second pass over the data), is never in the optimizer
state and is never trained. The teacher run must exist whenever the student's experiment is
built (training, and the commands that reopen the student's run).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from deepflow.data.pipeline import INPUTS
from deepflow.registry import ConfigError, TASKS
from deepflow.tasks.supervised import Classification

HF_PREFIX = "hf:"


def soft_loss(student_logits: jax.Array, teacher_logits: jax.Array,
              temperature: float) -> jax.Array:
  """Per-example ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``. The ``T^2`` keeps the
  soft term's gradient magnitude independent of ``T`` (Hinton et al.): w.r.t. the student's
  logits it is ``T * (softmax(student / T) - softmax(teacher / T))``."""
  log_student = jax.nn.log_softmax(student_logits / temperature, -1)
  log_teacher = jax.nn.log_softmax(teacher_logits / temperature, -1)
  kl = jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student), -1)
  return temperature ** 2 * kl


@TASKS.register("distillation")
class Distillation(Classification):
  """Classification whose training loss is ``hard_weight * CE(labels) + (1 - hard_weight) *
  soft_loss(student, teacher, temperature)`` per example (``soft_loss``); evaluation is the
  student's own (accuracy, loss against the labels). ``teacher``: a deepflow run directory
  (``hf:DIR``, a Hugging Face checkpoint, is refused for now). The teacher sees the student's
  training batches (after the batch regularizers), so both must read the same inputs: same
  shape, same preprocessing."""

  OPTIONS = {**Classification.OPTIONS, "teacher": None, "temperature": 2.0, "hard_weight": 0.5}

  def __init__(self, config, spec):
    super().__init__(config, spec)
    self.temperature, self.hard_weight = _check_options(self.options)
    self.teacher = self.teacher_params = self.teacher_state = None  # set by ``open_runs``

  def open_runs(self, reopen):
    self.teacher, self.teacher_params, self.teacher_state = self._load_teacher(
        self.options["teacher"], reopen)

  def _load_teacher(self, teacher: str, reopen) -> tuple[Any, Any, Any]:
    """(the teacher's task, its model parameters and model state on the host), checked to
    give this task's classes from its inputs."""
    if teacher.startswith(HF_PREFIX):
      raise ConfigError(f"task.teacher={teacher!r}: Hugging Face teachers need the hf: "
                        f"checkpoint loader, which this deepflow lacks; give a deepflow run")
    try:
      exp, state, _, _ = reopen(teacher)
    except FileNotFoundError as e:
      raise ConfigError(f"task.teacher: {e}") from None
    other = exp.task
    if not isinstance(other, Classification) or other.spec.num_classes != self.spec.num_classes:
      raise ConfigError(f"task.teacher {teacher!r} does not match the student's task: it gives "
                        f"{_outputs(other)}, the student's {self.config.data.source} has "
                        f"{self.spec.num_classes} classes")
    if tuple(other.spec.input_shape) != tuple(self.spec.input_shape):
      raise ConfigError(f"task.teacher {teacher!r} reads inputs of shape "
                        f"{tuple(other.spec.input_shape)}, the student's data gives "
                        f"{tuple(self.spec.input_shape)}")
    return other, jax.device_get(exp.model_params(state.params)), jax.device_get(state.model_state)

  def teacher_logits(self, inputs: jax.Array) -> jax.Array:
    """The frozen teacher's logits (inference mode: no dropout, running batch statistics)."""
    logits, _ = self.teacher.apply(self.teacher_params, self.teacher_state, inputs, None,
                                   train=False)
    return jax.lax.stop_gradient(logits)

  def loss(self, params, model_state, batch, rng):
    self._check_group(batch)
    logits, model_state = self.apply(params, model_state, batch[INPUTS], rng, train=True)
    hard, labels = self.hard_loss(logits, batch)
    soft = soft_loss(logits, self.teacher_logits(batch[INPUTS]), self.temperature)
    loss = jnp.mean(self.hard_weight * hard + (1 - self.hard_weight) * soft)
    metrics = {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
               "hard_loss": hard.mean(), "soft_loss": soft.mean()}
    return loss, (metrics, model_state)


def _check_options(options) -> tuple[float, float]:
  teacher, temperature, weight = (options["teacher"], options["temperature"],
                                  options["hard_weight"])
  if not isinstance(teacher, str) or not teacher:
    raise ConfigError(f"task 'distillation' needs task.teacher, a deepflow run directory, "
                      f"got {teacher!r}")
  if not _number(temperature) or temperature <= 0:
    raise ConfigError(f"task.temperature must be a number > 0, got {temperature!r}")
  if not _number(weight) or not 0 <= weight <= 1:
    raise ConfigError(f"task.hard_weight must be a number in [0, 1], got {weight!r}")
  return float(temperature), float(weight)


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _outputs(task) -> str:
  classes = getattr(task.spec, "num_classes", None)
  return (f"{classes} classes" if isinstance(task, Classification)
          else f"task {task.config.task.name!r}'s outputs, not class scores")
