"""The language-modelling task: exact token-level metrics over a split, the vocabulary taken
from the data, sampling and its one-line errors."""
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from deepflow import sample
from deepflow.data import sources
from deepflow.data.pipeline import Pipeline
from deepflow.registry import ConfigError
from deepflow.train.experiment import Experiment
from tests.helpers import tiny_config

TINY_LM = dict(name="transformer_lm", d_model=16, num_heads=2, num_layers=1, mlp_dim=32,
               max_len=128)


def lm_config(data_dir, *overrides, model=None):
  # eval_batch_size 64: not a divisor of the test chunks, so the last batch is padded.
  return tiny_config(*overrides, model=model or TINY_LM, task__name="language_model",
                     data__source="bundled:text", data__data_dir=data_dir, data__transforms=[],
                     data__batch_size=16, data__eval_batch_size=64, train__steps=2)


@pytest.fixture(scope="module")
def lm(data_dir, tmp_path_factory):
  exp = Experiment(lm_config(data_dir), str(tmp_path_factory.mktemp("lm")))
  return exp, exp.init_state()


def test_vocabulary_comes_from_the_data(lm):
  exp, state = lm
  vocab = exp.pipeline.spec.metadata["vocab"]
  assert exp.task.model.vocab_size == exp.task.model.num_outputs == len(vocab) == 103
  assert state.params["embed"]["embedding"].shape == (103, 16)


def test_eval_is_the_exact_token_cross_entropy_of_the_split(lm):
  exp, state = lm
  metrics = exp.evaluate(state, "test")
  split = sources.to_memory(exp.pipeline.dataset.split("test"))
  tokens, targets = np.asarray(split.arrays["inputs"]), np.asarray(split.arrays["targets"])
  logits = jax.jit(exp.task.model.apply)({"params": state.params}, tokens)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  # Every token of the split counted once, the padded rows of the last batch none (the chunk
  # count follows the interpreter's pydoc_data: 363 with Python 3.11.7, 364 with 3.11.2).
  assert tokens.shape[0] % exp.config.data.eval_batch_size != 0
  assert metrics["tokens"] == tokens.size
  np.testing.assert_allclose(metrics["loss"], float(nll.mean()), rtol=1e-5)
  np.testing.assert_allclose(metrics["perplexity"], np.exp(float(nll.mean())), rtol=1e-5)
  np.testing.assert_allclose(metrics["bits_per_token"], float(nll.mean()) / np.log(2), rtol=1e-5)
  correct = np.argmax(np.asarray(logits), -1) == targets
  np.testing.assert_allclose(metrics["accuracy"], correct.mean(), rtol=1e-6)


def test_ignored_targets_are_neither_scored_nor_counted(data_dir, tmp_path):
  exp = Experiment(lm_config(data_dir, "task.ignore_id=1"), str(tmp_path))
  logits = jnp.zeros((2, 3, 103)).at[:, :, 5].set(4.0)
  targets = jnp.array([[5, 1, 7], [1, 1, 5]])
  nll, weights, correct = exp.task.token_terms(logits, {"targets": targets})
  np.testing.assert_array_equal(weights, [[1, 0, 1], [0, 0, 1]])
  np.testing.assert_array_equal(correct, [[1, 0, 0], [0, 0, 1]])
  assert float(nll[0, 1]) == 0.0 and float(nll[0, 2]) > float(nll[0, 0]) > 0.0


def test_sampling_continues_the_prompt(lm, tmp_path):
  exp, state = lm
  task = exp.task
  greedy = task.sample(state.params, state.model_state, jax.random.key(0), 2, prompt="The ",
                       num_tokens=12, temperature=0.0)
  assert greedy["tokens"].shape == (2, 16)
  assert all(text.startswith("The ") and len(text) == 16 for text in greedy["text"])
  assert greedy["text"][0] == greedy["text"][1]  # greedy: the same for every draw
  drawn = task.sample(state.params, state.model_state, jax.random.key(0), 3, prompt="if",
                      temperature=1.0, top_k=5)
  assert drawn["tokens"].shape == (3, 128)  # by default, what max_len leaves after the prompt
  assert task.decode(task.encode("def f(x):\n")) == "def f(x):\n"
  paths = sample.save_samples(greedy, str(tmp_path / "samples"))
  text = open(paths[0]).read()
  assert paths[0].endswith("samples.txt") and text.startswith("--- sample 1 ---\nThe ")


def test_sampling_errors_are_one_line(lm):
  exp, state = lm
  draw = lambda **options: exp.task.sample(state.params, state.model_state,  # noqa: E731
                                           jax.random.key(0), 1, **options)
  for options, message in [
      (dict(prompt="caf\u00e9 \u20ac"),
       "outside the model's vocabulary of 103: '\u00e9', '\u20ac'"),
      (dict(prompt="x" * 100, num_tokens=40), "100 + num_tokens 40 = 140 exceeds the model's "
                                              "max_len 128"),
      (dict(prompt=""), "at least one token"),
      (dict(prompt="a", temperature=-1.0), "temperature"),
      (dict(prompt="a", size=3), "no sample option size"),
  ]:
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
      draw(**options)
    assert "\n" not in str(err.value)


def test_tiny_shakespeare_is_refused_in_one_line(tmp_path, monkeypatch):
  """One string per split cannot be batched: a clear error, not a crash (documented)."""
  monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
  with tfds.testing.mock_data(num_examples=1, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(ConfigError, match="declares no supervised_keys"):
      Pipeline(lm_config(str(tmp_path), "data.source=tfds:tiny_shakespeare"))


def test_configuration_errors(data_dir, tmp_path):
  def build(*overrides, model=None):  # a workdir each: fitted statistics are kept per run
    return Experiment(lm_config(data_dir, *overrides, model=model),
                      str(tmp_path / str(next(runs))))
  runs = itertools.count()
  with pytest.raises(ConfigError, match="needs int token inputs"):
    build("data.transforms=[{'name': 'standardize'}]")
  with pytest.raises(ConfigError, match="needs a token model"):
    build(model=dict(name="mlp"))
  with pytest.raises(ConfigError, match="smaller than the data's vocabulary of 103"):
    build("model.vocab_size=50")
  exp = build(model=dict(name="rnn", hidden_size=8, per_step=False))
  with pytest.raises(ConfigError, match="one prediction per position"):
    exp.evaluate(exp.init_state(), "test")
