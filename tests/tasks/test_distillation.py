"""Distillation: the soft term's gradient is Hinton et al.'s closed form (per example for a
classifier, per scored token for a language model), the teacher (a deepflow run or a Hugging
Face checkpoint) is frozen and evaluated inside the step, and bad teachers or options are
one-line errors."""
import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import deepflow
from deepflow.data.packing import POSITIONS, SEGMENTS
from deepflow.data.pipeline import INPUTS, TARGETS
from deepflow.hf import export as hf_export
from deepflow.models.transformer import TransformerLM
from deepflow.registry import ConfigError
from deepflow.tasks.distillation import soft_loss, token_loss
from deepflow.train import loop
from deepflow.train.experiment import Experiment
from tests.helpers import (TINY, deepflow_cli, experiment, experiment_text, tiny, tiny_config,
                           write_experiment)

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """A trained teacher run of another architecture than the students below (two layers)."""
  workdir = str(tmp_path_factory.mktemp("teacher"))
  loop.train_and_evaluate(tiny_config(model=dict(name="mlp", hidden=(48, 32)), train__steps=30,
                                      train__checkpoint_every=30), workdir)
  return workdir


def student(teacher, *overrides, **settings):
  config = tiny_config(*overrides, task=dict(name="distillation", teacher=teacher), **settings)
  return Experiment(config, None)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_soft_gradient_is_the_closed_form(temperature):
  """d/dz_s T^2 KL(softmax(z_t/T) || softmax(z_s/T)) = T (softmax(z_s/T) - softmax(z_t/T))."""
  z_s, z_t = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5)) * 3
  grad = jax.grad(lambda z: soft_loss(z, z_t, temperature).sum())(z_s)
  p = lambda z: np.exp(z / temperature) / np.exp(z / temperature).sum(-1, keepdims=True)  # noqa
  np.testing.assert_allclose(grad, temperature * (p(np.asarray(z_s)) - p(np.asarray(z_t))),
                             atol=1e-5)


def _reference_terms(z_s, z_t, targets, temperature: float) -> tuple[np.ndarray, np.ndarray]:
  """Hinton et al.'s two terms per example (or token) in float64 numpy: the cross-entropy on the
  targets and T^2 * KL(softmax(z_t/T) || softmax(z_s/T))."""
  z_s, z_t = np.asarray(z_s, np.float64), np.asarray(z_t, np.float64)
  log_softmax = lambda z: z - np.log(np.exp(z).sum(-1, keepdims=True))  # noqa: E731
  hard = -np.take_along_axis(log_softmax(z_s), np.asarray(targets)[..., None], -1)[..., 0]
  lt, ls = log_softmax(z_t / temperature), log_softmax(z_s / temperature)
  return hard, temperature ** 2 * (np.exp(lt) * (lt - ls)).sum(-1)


def _reference_loss(z_s, z_t, labels, temperature: float, hard_weight: float) -> float:
  hard, soft = _reference_terms(z_s, z_t, labels, temperature)
  return np.mean(hard_weight * hard + (1 - hard_weight) * soft)


def test_loss_mixes_labels_and_teacher(teacher):
  """The task's loss is hard_weight * CE + (1 - hard_weight) * T^2 KL with the teacher's logits
  recomputed from its own run, in numpy."""
  exp = student(teacher, "task.temperature=3.0", "task.hard_weight=0.25")
  batch = next(iter(exp.pipeline.eval_batches("test")))
  params, model_state = exp.task.init(jax.random.PRNGKey(1))
  loss, _ = exp.task.loss(params, model_state, batch, jax.random.PRNGKey(2))
  t_exp, t_state, _, _ = Experiment.from_workdir(teacher)
  z_t = np.asarray(t_exp.task.apply(t_state.params, t_state.model_state, batch[INPUTS], None,
                                    train=False)[0], np.float64)
  z_s = exp.task.apply(params, model_state, batch[INPUTS], None, train=False)[0]
  np.testing.assert_allclose(loss, _reference_loss(z_s, z_t, batch[TARGETS], 3.0, 0.25),
                             rtol=1e-5)


def test_cli_run_leaves_the_teacher_bit_unchanged(teacher, tmp_path):
  """A distilled run trains through the CLI; the teacher's parameters are in no optimizer state
  and are bit-identical afterwards."""
  before = jax.device_get(Experiment.from_workdir(teacher).state.params)
  config = write_experiment(tmp_path / "student.py", experiment_text({
      **TINY, "task": dict(name="distillation", teacher=teacher, temperature=2.0,
                           hard_weight=0.5), "train.steps": 20}))
  out = deepflow_cli("train", "--config", config, "--workdir", str(tmp_path / "run"))
  assert out.returncode == 0, out.stderr
  restored = Experiment.from_workdir(str(tmp_path / "run"))
  assert restored.experiment.task.model.hidden == (32,)  # the student's own architecture
  assert (len(jax.tree.leaves(restored.state.params))
          == len(jax.tree.leaves(jax.device_get(Experiment.from_workdir(teacher).state.params)))
          - 2)  # one layer fewer: the teacher's weights are not among the student's
  after = jax.device_get(Experiment.from_workdir(teacher).state.params)
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(x, y)
  for x, y in zip(jax.tree.leaves(before),
                  jax.tree.leaves(restored.experiment.task.teacher_params)):
    np.testing.assert_array_equal(x, y)
  assert 0.3 < jnp.asarray(restored.experiment.evaluate(restored.state, "test")["accuracy"])


def test_bad_teachers_and_options(teacher, tmp_path):
  regression = str(tmp_path / "regression")
  loop.train_and_evaluate(tiny_config(task=dict(name="regression"), train__steps=2,
                                      data__source="synthetic:regression",
                                      train__checkpoint_every=2), regression)
  cases = {(regression,): "does not match the student's task",
           (str(tmp_path / "missing"),): "task.teacher: .* is not a deepflow run",
           ("hf:/some/dir",): "task.teacher: /some/dir: no such directory",
           (f"hf:{FIXTURES}/hf/gpt2",): "cannot read the student's inputs of shape",
           (teacher, "task.temperature=0.0"): "task.temperature must be a number > 0",
           (teacher, "task.hard_weight=1.5"): r"task.hard_weight must be a number in \[0, 1\]"}
  for (path, *overrides), message in cases.items():
    with pytest.raises(ConfigError, match=message) as e:
      student(path, *overrides)
    assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="needs task.teacher"):
    Experiment(tiny_config(task=dict(name="distillation")), None)


# -- language models, from a Hugging Face teacher ------------------------------------------------

@pytest.mark.parametrize("temperature,hard_weight", [(1.0, 0.0), (3.0, 0.3)])
def test_token_gradient_is_the_closed_form(temperature, hard_weight):
  """d/dz of token_loss at a scored token t (weight w_t, n scored tokens) is
  w_t / n * (h (softmax(z) - onehot(y)) + (1 - h) T (softmax(z/T) - softmax(z_t/T))); unscored
  tokens get none."""
  z_s, z_t = jax.random.normal(jax.random.PRNGKey(0), (2, 2, 3, 5)) * 3
  targets = jnp.asarray([[1, 4, 0], [2, 2, 3]])
  weights = jnp.asarray([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])

  def loss(z):
    nll = optax.softmax_cross_entropy_with_integer_labels(z, targets) * weights
    return token_loss(z, z_t, nll, weights, temperature, hard_weight)[0]

  p = lambda z, t=1.0: np.exp(z / t) / np.exp(z / t).sum(-1, keepdims=True)  # noqa: E731
  z, zt = np.asarray(z_s, np.float64), np.asarray(z_t, np.float64)
  expected = (hard_weight * (p(z) - np.eye(5)[np.asarray(targets)])
              + (1 - hard_weight) * temperature * (p(z, temperature) - p(zt, temperature)))
  expected *= np.asarray(weights)[..., None] / 4
  np.testing.assert_allclose(jax.grad(loss)(z_s), expected, atol=1e-6)


def write_gpt2(path, vocab: int) -> str:
  """A one-layer GPT-2 checkpoint of ``vocab`` tokens and 128 positions (the text's chunks)."""
  model = TransformerLM(num_outputs=vocab, vocab_size=vocab, d_model=32, num_heads=4,
                        num_layers=1, mlp_dim=64, max_len=128, tie_embeddings=True)
  variables = model.init(jax.random.PRNGKey(3), np.zeros((1, 4), np.int32))
  hf_export.write_pretrained(model, variables, str(path))
  return str(path)


@pytest.fixture(scope="module")
def gpt2_teacher(tmp_path_factory):
  """A GPT-2 checkpoint whose vocabulary (128) holds the bundled text's 103 characters."""
  return write_gpt2(tmp_path_factory.mktemp("hf") / "gpt2", 128)


def lm_student(data_dir, teacher, *overrides):
  """experiments/hf_distill.py's student, one layer of 16, distilled from ``teacher`` at T=3 with
  hard weight 0.25, on the bundled characters instead of its checkpoint's tokenizer."""
  path, _ = experiment("hf_distill")
  return deepflow.load_config(path, [
      *tiny(data_dir, steps=3), f"task.teacher='{teacher}'", "task.temperature=3.0",
      "task.hard_weight=0.25", "data.source=bundled:text", "data.tokenizer=''",
      "model.d_model=16", "model.num_heads=2", "model.num_layers=1", "model.mlp_dim=32",
      "data.batch_size=8", "data.eval_split='test[:2%]'", "train.eval_every=0",
      "train.checkpoint_every=0", "optimizer.warmup_steps=0", *overrides])


def test_lm_loss_uses_the_pretrained_teacher(data_dir, gpt2_teacher):
  """The step's loss is the mean over tokens of 0.25 * NLL + 0.75 * 9 KL, with the teacher's
  logits those of ``deepflow.load_pretrained`` on the same tokens, cut to the text's 103
  characters, in numpy."""
  exp = Experiment(lm_student(data_dir, f"hf:{gpt2_teacher}"), None)
  batch = next(iter(exp.pipeline.eval_batches("test")))
  params, model_state = exp.task.init(jax.random.PRNGKey(1))
  loss, (metrics, _) = exp.task.loss(params, model_state, batch, jax.random.PRNGKey(2))
  model, variables = deepflow.load_pretrained(gpt2_teacher)
  z_t = np.asarray(model.apply(variables, batch[INPUTS]), np.float64)[..., :103]
  z_s = exp.task.apply(params, model_state, batch[INPUTS], None, train=False)[0]
  nll, soft = _reference_terms(z_s, z_t, batch[TARGETS], 3.0)
  np.testing.assert_allclose(metrics["soft_loss"], soft.mean(), rtol=1e-5)
  np.testing.assert_allclose(loss, np.mean(0.25 * nll + 0.75 * soft), rtol=1e-5)


def test_lm_distilled_from_hf_leaves_the_checkpoint_bit_unchanged(data_dir, gpt2_teacher,
                                                                    tmp_path):
  """experiments/hf_distill.py's student trains from the checkpoint for 3 steps; the teacher
  variables the run holds are the checkpoint's, bit for bit, and its files are untouched."""
  digest = lambda: {f: hashlib.sha256(open(os.path.join(gpt2_teacher, f), "rb").read()  # noqa
                                      ).hexdigest() for f in sorted(os.listdir(gpt2_teacher))}
  before = digest()
  metrics = deepflow.train_and_evaluate(lm_student(data_dir, f"hf:{gpt2_teacher}"),
                                        str(tmp_path / "run"))
  assert np.isfinite(metrics["perplexity"])
  restored = Experiment.from_workdir(str(tmp_path / "run"))
  assert restored.experiment.task.model.d_model == 16  # the student's own architecture
  _, variables = deepflow.load_pretrained(gpt2_teacher)
  held = jax.tree.leaves(restored.experiment.task.teacher_params)
  assert len(held) == len(jax.tree.leaves(variables["params"]))
  for x, y in zip(jax.tree.leaves(variables["params"]), held):
    np.testing.assert_array_equal(x, y)
  assert digest() == before


def test_bad_hf_teachers(data_dir, gpt2_teacher, tmp_path):
  """A vocabulary smaller than the student's, positions fewer than the text's chunk (the
  committed GPT-2 fixture's 64), a tokenizer other than the data's, a missing directory, a
  classifier's option on a language-model student: one line each."""
  tokenized = str(tmp_path / "tokenized")
  shutil.copytree(gpt2_teacher, tokenized)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(FIXTURES, "hf_tokenizers", "gpt2_bpe", name), tokenized)
  cases = {(write_gpt2(tmp_path / "small", 64),):
           r"gives 64 outputs, the student gives logits over 103 tokens",
           (os.path.join(FIXTURES, "hf", "gpt2"),):
           r"cannot read the student's inputs of shape \(128,\) int32",
           (tokenized,): r"reads the ids of its own tokenizer.*set data.tokenizer='hf:",
           (str(tmp_path / "missing"),): "task.teacher: .*missing: no such directory",
           (gpt2_teacher, "task.class_weights='balanced'"):
           "task.class_weights is an option of the other kind of student; this LanguageModel"}
  for (path, *overrides), message in cases.items():
    with pytest.raises(ConfigError, match=message) as e:
      Experiment(lm_student(data_dir, f"hf:{path}", *overrides), None)
    assert "\n" not in str(e.value)



def test_text_distill_from_a_language_model_run(data_dir, teacher, tmp_path):
  """experiments/text_distill.py's student distils from a text_transformer run (the teacher's
  parameters held bit for bit); a classifier run is no teacher for it (one line)."""
  small = ["model.d_model=16", "model.num_heads=2", "model.num_layers=1", "model.mlp_dim=32",
           *tiny(data_dir, steps=2), "data.batch_size=8", "data.eval_split='test[:2%]'",
           "train.eval_every=0", "train.checkpoint_every=0", "optimizer.warmup_steps=0"]
  lm_teacher = str(tmp_path / "text_transformer")
  deepflow.train_and_evaluate(deepflow.load_config(experiment("text_transformer")[0], small),
                              lm_teacher)
  path = experiment("text_distill")[0]
  metrics = deepflow.train_and_evaluate(
      deepflow.load_config(path, [*small, f"task.teacher='{lm_teacher}'"]), str(tmp_path / "s"))
  assert np.isfinite(metrics["perplexity"])
  held = Experiment.from_workdir(str(tmp_path / "s")).experiment.task.teacher_params
  for x, y in zip(jax.tree.leaves(Experiment.from_workdir(lm_teacher).state.params),
                  jax.tree.leaves(held)):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(ConfigError, match="it is a 'classification' run, the student needs a "
                                        "LanguageModel teacher") as e:
    Experiment(deepflow.load_config(path, [*small, f"task.teacher='{teacher}'"]), None)
  assert "\n" not in str(e.value)


def test_classifier_distilled_from_an_hf_resnet(image_data_dir, tmp_path):
  """A ResNet checkpoint of the data's 10 classes (the committed fixture's layout) teaches an MLP
  on generated 16x16 colour images: the loss is the classification formula with the teacher's
  logits those of ``deepflow.load_pretrained`` (batch statistics included), in numpy; the
  fixture's own 5 classes are one line."""
  from deepflow.hf import load, resnet
  with open(os.path.join(FIXTURES, "hf_vision", "resnet_basic", "config.json")) as f:
    hf_config = json.load(f)
  hf_config["id2label"] = {str(i): f"LABEL_{i}" for i in range(10)}
  model = load.build(resnet.model_section(hf_config), {})
  variables = model.init(jax.random.PRNGKey(4), np.zeros((1, 16, 16, 3), np.float32))
  checkpoint = str(tmp_path / "resnet")
  hf_export.write_pretrained(model, variables, checkpoint)
  data = dict(data__source="tfds:gen_jpeg", data__data_dir=image_data_dir)
  exp = Experiment(tiny_config(task=dict(name="distillation", teacher=f"hf:{checkpoint}",
                                         temperature=2.0, hard_weight=0.5), **data), None)
  batch = next(iter(exp.pipeline.eval_batches("test")))
  params, model_state = exp.task.init(jax.random.PRNGKey(1))
  loss, _ = exp.task.loss(params, model_state, batch, jax.random.PRNGKey(2))
  teacher_model, teacher_variables = deepflow.load_pretrained(checkpoint)
  assert "batch_stats" in teacher_variables
  z_t = np.asarray(teacher_model.apply(teacher_variables, batch[INPUTS]), np.float64)
  z_s = exp.task.apply(params, model_state, batch[INPUTS], None, train=False)[0]
  np.testing.assert_allclose(loss, _reference_loss(z_s, z_t, batch[TARGETS], 2.0, 0.5),
                             rtol=1e-5)
  fixture = os.path.join(FIXTURES, "hf_vision", "resnet_basic")
  with pytest.raises(ConfigError, match="gives 5 outputs, the student has 10 classes") as e:
    Experiment(tiny_config(task=dict(name="distillation", teacher=f"hf:{fixture}"), **data), None)
  assert "\n" not in str(e.value)


def test_lm_distillation_on_packed_documents(data_dir, tmp_path):
  """Documents tokenized by the teacher's own tokenizer and packed into rows: the teacher reads
  the rows' segments and positions as the student does, and only document tokens are scored
  (the packing padding is not), in numpy against ``deepflow.load_pretrained``'s logits."""
  teacher = write_gpt2(tmp_path / "gpt2_bpe", 1001)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(FIXTURES, "hf_tokenizers", "gpt2_bpe", name), teacher)
  exp = Experiment(lm_student(data_dir, f"hf:{teacher}", "data.source=bundled:text/documents",
                              f"data.tokenizer='hf:{teacher}'", "data.seq_len=64"), None)
  batch = dict(next(iter(exp.pipeline.eval_batches("test"))))
  segments, positions = np.array(batch[SEGMENTS]), np.asarray(batch[POSITIONS])
  assert segments.max() > 1  # rows of several documents
  segments[0, -10:] = 0  # and a row ending in padding, as the last row of a stream does
  batch[SEGMENTS] = jnp.asarray(segments)
  params, model_state = exp.task.init(jax.random.PRNGKey(1))
  loss, (metrics, _) = exp.task.loss(params, model_state, batch, jax.random.PRNGKey(2))
  model, variables = deepflow.load_pretrained(teacher)
  z_t = np.asarray(model.apply(variables, batch[INPUTS], segments, positions), np.float64)
  z_s = exp.task.logits(params, model_state, batch, None, train=False)[0]
  nll, soft = _reference_terms(z_s, z_t, batch[TARGETS], 3.0)
  scored = segments > 0
  np.testing.assert_allclose(metrics["soft_loss"], soft[scored].mean(), rtol=1e-5)
  np.testing.assert_allclose(loss, np.mean(0.25 * nll[scored] + 0.75 * soft[scored]), rtol=1e-5)
