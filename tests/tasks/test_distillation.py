"""Distillation: the soft term's gradient is Hinton et al.'s closed form, the teacher is frozen
and evaluated inside the step, and bad teachers or options are one-line errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepflow.data.pipeline import INPUTS, TARGETS
from deepflow.registry import ConfigError
from deepflow.tasks.distillation import soft_loss
from deepflow.train import loop
from deepflow.train.experiment import Experiment
from tests.helpers import TINY, deepflow_cli, experiment_text, tiny_config, write_experiment


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
  z_s = np.asarray(exp.task.apply(params, model_state, batch[INPUTS], None, train=False)[0],
                   np.float64)
  log_softmax = lambda z: z - np.log(np.exp(z).sum(-1, keepdims=True))  # noqa: E731
  labels = np.asarray(batch[TARGETS])
  hard = -log_softmax(z_s)[np.arange(len(labels)), labels]
  lt, ls = log_softmax(z_t / 3), log_softmax(z_s / 3)
  soft = 9 * (np.exp(lt) * (lt - ls)).sum(-1)
  np.testing.assert_allclose(loss, np.mean(0.25 * hard + 0.75 * soft), rtol=1e-5)


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
           ("hf:/some/dir",): "Hugging Face teachers",
           (teacher, "task.temperature=0.0"): "task.temperature must be a number > 0",
           (teacher, "task.hard_weight=1.5"): r"task.hard_weight must be a number in \[0, 1\]"}
  for (path, *overrides), message in cases.items():
    with pytest.raises(ConfigError, match=message) as e:
      student(path, *overrides)
    assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="needs task.teacher"):
    Experiment(tiny_config(task=dict(name="distillation")), None)
