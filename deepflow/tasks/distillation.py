"""Knowledge distillation (Hinton et al., 2015): a student trained on its labels and on a trained
teacher's softened outputs; a classifier on the teacher's class scores, a language model on its
next-token distribution at every scored position.

``task.teacher`` is any deepflow run directory, reopened through ``Experiment.from_workdir``,
which the experiment hands the task (``Task.open_runs``: tasks do not import train/), or
``hf:DIR``, a Hugging Face checkpoint read by ``deepflow.load_pretrained``. Either brings its
own model: the teacher may have another architecture than the student. Its variables enter the
train step as constants, so the teacher is evaluated inside the same jitted step on the same
batch (no second pass over the data), is never in the optimizer state and is never trained. The
teacher must exist whenever the student's experiment is built (training, and the commands that
reopen the student's run).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deepflow.data.packing import POSITIONS, SEGMENTS
from deepflow.data.pipeline import INPUTS
from deepflow.registry import ConfigError, TASKS, first_line, is_number
from deepflow.tasks.language import LanguageModel
from deepflow.tasks.supervised import Classification

HF_PREFIX = "hf:"
TEACHER_OPTIONS = {"teacher": None, "temperature": 2.0, "hard_weight": 0.5}


def soft_loss(student_logits: jax.Array, teacher_logits: jax.Array,
              temperature: float) -> jax.Array:
  """Per-example ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``. The ``T^2`` keeps the
  soft term's gradient magnitude independent of ``T`` (Hinton et al.): w.r.t. the student's
  logits it is ``T * (softmax(student / T) - softmax(teacher / T))``."""
  log_student = jax.nn.log_softmax(student_logits / temperature, -1)
  log_teacher = jax.nn.log_softmax(teacher_logits / temperature, -1)
  kl = jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student), -1)
  return temperature ** 2 * kl


def token_loss(student_logits: jax.Array, teacher_logits: jax.Array, nll: jax.Array,
               weights: jax.Array, temperature: float, hard_weight: float
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(loss, hard term, soft term) of a language model: means over the scored tokens (``weights``
  (B, T), 0 at padding and ``ignore_id``) of ``hard_weight * nll + (1 - hard_weight) *
  soft_loss``, ``nll`` being the already weighted next-token cross-entropy. The language-model
  loss's masking and normalisation, so ``hard_weight=1`` is exactly its loss."""
  count = jnp.maximum(weights.sum(), 1.0)
  hard = nll.sum() / count
  soft = jnp.sum(soft_loss(student_logits, teacher_logits, temperature) * weights) / count
  return hard_weight * hard + (1 - hard_weight) * soft, hard, soft


class _Distilled:
  """What both students share: the options, the frozen teacher (module, parameters and state on
  the host) and its logits on a training batch. A student class also names the task the teacher
  must have (``TEACHER_TASK``), whether a teacher may score more outputs than the student
  (``WIDER_TEACHER``: the first ``width`` are the student's) and what its outputs are
  (``_outputs``)."""

  TEACHER_TASK: type
  WIDER_TEACHER: bool

  def __init__(self, config, spec):
    super().__init__(config, spec)
    self.temperature, self.hard_weight = _check_options(self.options)
    params, model_state = jax.eval_shape(self.init, jax.random.PRNGKey(0))
    self.width = self._width(self.model, {"params": params, **model_state})
    # set by ``open_runs``
    self.teacher_model = self.teacher_params = self.teacher_state = None

  def open_runs(self, reopen):
    teacher = self.options["teacher"]
    model, variables = (self._hf_teacher(teacher) if teacher.startswith(HF_PREFIX)
                        else self._run_teacher(teacher, reopen))
    self._check_outputs(teacher, model, variables)
    variables = dict(variables)
    self.teacher_model, self.teacher_params = model, variables.pop("params")
    self.teacher_state = variables

  def _run_teacher(self, teacher: str, reopen) -> tuple[Any, dict]:
    """A deepflow run's model and host variables (LoRA merged), of this student's kind of
    task."""
    try:
      exp, state, _, _ = reopen(teacher)
    except FileNotFoundError as e:
      raise ConfigError(f"task.teacher: {e}") from None
    other = exp.task
    if not isinstance(other, self.TEACHER_TASK):
      raise ConfigError(f"task.teacher {teacher!r} does not match the student's task: it is a "
                        f"{other.config.task.name!r} run, the student needs a "
                        f"{self.TEACHER_TASK.__name__} teacher ({self._outputs()})")
    return other.model, {"params": jax.device_get(exp.model_params(state.params)),
                         **jax.device_get(state.model_state)}

  def _hf_teacher(self, teacher: str) -> tuple[Any, dict]:
    """A Hugging Face checkpoint's model and host variables (its dtype kept)."""
    from deepflow.hf import load
    directory = teacher[len(HF_PREFIX):]
    try:
      model, variables = load.load_pretrained(directory)
    except FileNotFoundError as e:
      raise ConfigError(f"task.teacher: {e}") from None
    self._check_tokenizer(directory)
    return model, jax.device_get(variables)

  def _check_tokenizer(self, directory: str) -> None:
    """Where it can be known: the teacher's tokenizer must be the student's data's."""

  def _width(self, model, variables) -> int:
    """The size of the last axis of ``model``'s logits on the student's inputs, from shapes alone
    (nothing is computed)."""
    example = jnp.zeros((1, *self.spec.input_shape), self.spec.input_dtype)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, example)
    return out.shape[-1]

  def _check_outputs(self, teacher: str, model, variables) -> None:
    """The teacher reads the student's inputs and scores what the student scores (its logits'
    last axis is the student's, for a language model at least the student's vocabulary),
    checked on shapes alone before anything is compiled."""
    try:
      width = self._width(model, variables)
    except Exception as e:  # noqa: BLE001  (any failure to trace is the mismatch, in one line)
      raise ConfigError(f"task.teacher {teacher!r} cannot read the student's inputs of shape "
                        f"{tuple(self.spec.input_shape)} {np.dtype(self.spec.input_dtype)} "
                        f"({first_line(e)})") from None
    if width < self.width or (width > self.width and not self.WIDER_TEACHER):
      raise ConfigError(f"task.teacher {teacher!r} does not match the student's task: it gives "
                        f"{width} outputs, the student {self._outputs()}")

  def teacher_logits(self, batch) -> jax.Array:
    """The frozen teacher's float32 logits on a batch (inference mode: no dropout, running batch
    statistics; a packed batch's documents attend within themselves, as the student's)."""
    packed = (batch[SEGMENTS], batch[POSITIONS]) if SEGMENTS in batch else ()
    variables = {"params": self.teacher_params, **self.teacher_state}
    logits = self.teacher_model.apply(variables, batch[INPUTS], *packed, train=False)
    return jax.lax.stop_gradient(logits[..., :self.width].astype(jnp.float32))


class Distillation(_Distilled, Classification):
  """Classification whose training loss is ``hard_weight * CE(labels) + (1 - hard_weight) *
  soft_loss(student, teacher, temperature)`` per example (``soft_loss``); evaluation is the
  student's own (accuracy, loss against the labels). The teacher sees the student's training
  batches (after the batch regularizers), so both must read the same inputs: same shape, same
  preprocessing."""

  OPTIONS = {**Classification.OPTIONS, **TEACHER_OPTIONS}
  TEACHER_TASK = Classification
  WIDER_TEACHER = False

  def _outputs(self) -> str:
    return f"has {self.spec.num_classes} classes ({self.config.data.source})"

  def loss(self, params, model_state, batch, rng):
    self._check_group(batch)
    logits, model_state = self.apply(params, model_state, batch[INPUTS], rng, train=True)
    hard, labels = self.hard_loss(logits, batch)
    soft = soft_loss(logits, self.teacher_logits(batch), self.temperature)
    loss = jnp.mean(self.hard_weight * hard + (1 - self.hard_weight) * soft)
    metrics = {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
               "hard_loss": hard.mean(), "soft_loss": soft.mean()}
    return loss, (metrics, model_state)


class LanguageModelDistillation(_Distilled, LanguageModel):
  """Language modelling whose training loss is ``token_loss``: per scored token, the labels'
  cross-entropy and the teacher's softened next-token distribution, masked as the language
  model's loss; evaluation is the student's own (perplexity against the text). The teacher's
  vocabulary must hold the student's: a larger one (a checkpoint's vocabulary padded past its
  tokenizer's, a character set inside a larger one) is cut to the student's tokens, its
  distribution renormalised over them (the others never occur in the data). A Hugging Face
  teacher with a ``tokenizer.json`` must have the data tokenized by that tokenizer."""

  OPTIONS = {**LanguageModel.OPTIONS, **TEACHER_OPTIONS}
  TEACHER_TASK = LanguageModel
  WIDER_TEACHER = True

  def _outputs(self) -> str:
    return f"gives logits over {self.width} tokens ({self.config.data.source})"

  def _check_tokenizer(self, directory: str) -> None:
    from deepflow.data import hf_tokenizer
    from deepflow.data.tokenizers import hf_spec
    if not hf_spec(directory):
      return  # a checkpoint without its tokenizer: the ids cannot be compared
    ours = str(self.config.data.get("tokenizer") or "")
    theirs = hf_tokenizer.load(directory).tokenizer.get_vocab(with_added_tokens=True)
    if not ours.startswith(HF_PREFIX) or hf_tokenizer.load(
        ours[len(HF_PREFIX):]).tokenizer.get_vocab(with_added_tokens=True) != theirs:
      raise ConfigError(f"task.teacher 'hf:{directory}' reads the ids of its own tokenizer, the "
                        f"student's data by {repr(ours) if ours else 'its dataset'}; set "
                        f"data.tokenizer='hf:{directory}'")

  def loss(self, params, model_state, batch, rng):
    logits, model_state = self.logits(params, model_state, batch, rng, train=True)
    nll, weights, correct = self.token_terms(logits, batch)
    loss, hard, soft = token_loss(logits, self.teacher_logits(batch), nll, weights,
                                  self.temperature, self.hard_weight)
    accuracy = correct.sum() / jnp.maximum(weights.sum(), 1.0)
    return loss, ({"accuracy": accuracy, "hard_loss": hard, "soft_loss": soft}, model_state)


@TASKS.register("distillation")
def distillation(config, spec) -> _Distilled:
  """A student trained on its labels and a frozen teacher's softened outputs (``task.teacher``: a
  deepflow run or ``hf:DIR``): a language model on token data without classes, else a
  classifier. Each kind of student is its own class (``LanguageModelDistillation``,
  ``Distillation``); the options of the other kind are refused."""
  tokens = np.issubdtype(np.dtype(spec.input_dtype), np.integer) and not spec.num_classes
  student = LanguageModelDistillation if tokens else Distillation
  foreign = [k for k, v in distillation.OPTIONS.items()
             if k not in student.OPTIONS and config.task.get(k, v) != v]
  if foreign:
    raise ConfigError(f"task.{foreign[0]} is an option of the other kind of student; this "
                      f"{student.TEACHER_TASK.__name__} student ({config.data.source}) takes "
                      f"{', '.join(sorted(student.OPTIONS))}")
  return student(config, spec)


# The task section's options (as a task class declares them): either student's.
distillation.OPTIONS = {**Distillation.OPTIONS, **LanguageModelDistillation.OPTIONS}


def _check_options(options) -> tuple[float, float]:
  teacher, temperature, weight = (options["teacher"], options["temperature"],
                                  options["hard_weight"])
  if not isinstance(teacher, str) or not teacher:
    raise ConfigError(f"task 'distillation' needs task.teacher, a deepflow run directory or "
                      f"'hf:DIR' (a Hugging Face checkpoint), got {teacher!r}")
  if not is_number(temperature) or temperature <= 0:
    raise ConfigError(f"task.temperature must be a number > 0, got {temperature!r}")
  if not is_number(weight) or not 0 <= weight <= 1:
    raise ConfigError(f"task.hard_weight must be a number in [0, 1], got {weight!r}")
  return float(temperature), float(weight)
