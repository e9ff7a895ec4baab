"""Sampling: cached vs uncached decoding, a reference greedy loop, top-k, and the checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepflow.models import decoding, rnn, transformer
from deepflow.registry import ConfigError

VOCAB = 11
# rbg keys: their initialisers compile several times faster than threefry's on CPU
KEY = jax.random.key(0, impl="rbg")


@pytest.fixture(scope="module")
def prompt():
  return jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, 3)), jnp.int32)


@pytest.fixture(scope="module")
def lm():
  model = transformer.TransformerLM(VOCAB, vocab_size=VOCAB, d_model=16, num_heads=2,
                                    num_layers=2, mlp_dim=32, max_len=12)
  return model, model.init(KEY, jnp.zeros((2, 12), jnp.int32))


@pytest.fixture(scope="module")
def rnn_lm():
  model = rnn.RNN(VOCAB, cell="gru", hidden_size=8, num_layers=2, vocab_size=VOCAB,
                  per_step=True)
  return model, model.init(KEY, jnp.zeros((2, 12), jnp.int32))


def greedy_reference(model, variables, prompt, num_tokens):
  """Argmax of the plain forward pass at the newest position, one token at a time (over a
  fixed-length buffer, to compile once; causality, tested elsewhere, makes the tail moot)."""
  forward = jax.jit(model.apply)
  length = prompt.shape[1]
  tokens = np.zeros((prompt.shape[0], length + num_tokens), np.int32)
  tokens[:, :length] = prompt
  for t in range(length, length + num_tokens):
    tokens[:, t] = np.argmax(forward(variables, jnp.asarray(tokens))[:, t - 1], axis=-1)
  return tokens


@pytest.mark.parametrize("which", ["lm", "rnn_lm"])
def test_greedy_with_and_without_cache_match_the_reference(which, prompt, request):
  model, variables = request.getfixturevalue(which)
  want = greedy_reference(model, variables, prompt, 9)
  for use_cache in (True, False):
    got = decoding.sample(model, variables, prompt, 9, jax.random.key(0), temperature=0.0,
                          use_cache=use_cache)
    assert got.shape == (2, 12)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("which", ["lm", "rnn_lm"])
def test_sampling_with_and_without_cache_draws_the_same_tokens(which, prompt, request):
  model, variables = request.getfixturevalue(which)
  jitted = jax.jit(decoding.sample, static_argnums=(0, 3),
                   static_argnames=("temperature", "top_k", "use_cache"))
  rng = jax.random.key(4, impl="rbg")
  cached = jitted(model, variables, prompt, 9, rng, temperature=1.5, top_k=8)
  full = decoding.sample(model, variables, prompt, 9, rng, temperature=1.5, top_k=8,
                         use_cache=False)
  np.testing.assert_array_equal(cached, full)
  np.testing.assert_array_equal(cached[:, :3], prompt)
  assert len(np.unique(np.asarray(cached[:, 3:]))) > 2  # really sampled, not a constant


def test_choose_top_k_and_greedy():
  logits = jnp.tile(jnp.array([0.0, 3.0, 2.9, -1.0, 2.8]), (2000, 1))
  drawn = np.asarray(decoding.choose(logits, KEY, 1.0, 2))
  assert set(np.unique(drawn)) == {1, 2}
  drawn = np.asarray(decoding.choose(logits, KEY, 1.0, 0))
  assert set(np.unique(drawn)) == {0, 1, 2, 3, 4}
  np.testing.assert_array_equal(decoding.choose(logits, KEY, 1.0, 1), 1)
  np.testing.assert_array_equal(decoding.choose(logits, KEY, 0.0, 0), 1)


def test_config_errors(lm, prompt):
  model, variables = lm
  with pytest.raises(ConfigError, match="exceeds the model's max_len 12") as err:
    decoding.sample(model, variables, prompt, 10, jax.random.key(0))
  assert "\n" not in str(err.value)
  encoder = transformer.TransformerEncoder(VOCAB, vocab_size=VOCAB)
  to_one = rnn.RNN(VOCAB, vocab_size=VOCAB)
  for not_lm in (encoder, to_one):
    with pytest.raises(ConfigError, match="generative language model"):
      decoding.sample(not_lm, {}, prompt, 2, jax.random.key(0))
  with pytest.raises(ConfigError, match="vocab_size"):
    decoding.sample(transformer.TransformerLM(VOCAB), {}, prompt, 2, jax.random.key(0))
  with pytest.raises(ConfigError, match="temperature"):
    decoding.sample(model, variables, prompt, 2, jax.random.key(0), temperature=-1.0)
