"""Recurrent models: shapes, the bidirectional readout against numpy, carried state, learning."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepflow.models import rnn
from deepflow.registry import ConfigError, MODELS
from tests.helpers import next_token_losses

# rbg keys: their initialisers compile several times faster than threefry's on CPU
KEY = jax.random.key(0, impl="rbg")


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_shapes_stacked_and_bidirectional(cell):
  x = jnp.ones((3, 7, 4))
  model = MODELS.get("rnn")(5, cell=cell, hidden_size=8, num_layers=2, bidirectional=True)
  variables = jax.eval_shape(model.init, KEY, x)  # shapes only: nothing is compiled
  assert jax.eval_shape(model.apply, variables, x).shape == (3, 5)
  assert {"layer0_forward", "layer0_backward", "layer1_forward", "layer1_backward",
          "head"} == set(variables["params"])
  assert variables["params"]["head"]["kernel"].shape == (16, 5)


def test_token_inputs_per_step_and_float_series():
  model = rnn.RNN(11, cell="gru", hidden_size=8, vocab_size=11, embed_dim=6, per_step=True)
  x = jnp.zeros((2, 9), jnp.int32)
  shapes = lambda x: jax.eval_shape(model.apply, jax.eval_shape(model.init, KEY, x), x)  # noqa
  assert shapes(x).shape == (2, 9, 11)
  model = rnn.RNN(1, hidden_size=8)  # univariate (B, T) series -> one regression target
  assert shapes(jnp.ones((2, 9))).shape == (2, 1)


def test_config_errors():
  x = jnp.ones((2, 5, 3))
  trace = lambda model, x: jax.eval_shape(model.init, KEY, x)  # noqa: E731  (no compiling)
  with pytest.raises(ConfigError, match="unidirectional"):
    trace(rnn.RNN(4, per_step=True, bidirectional=True), x)
  with pytest.raises(ConfigError, match="unknown cell"):
    trace(rnn.RNN(4, cell="transformer"), x)
  with pytest.raises(ConfigError, match="int tokens"):
    trace(rnn.RNN(4, vocab_size=10), x[..., 0])


def test_bidirectional_readout_matches_numpy():
  """Sequence-to-one reads the forward state after the last step and the backward state after
  the first step: checked against a numpy Elman RNN, h = tanh(x Wi + bi + h Wh)."""
  model = rnn.RNN(3, cell="rnn", hidden_size=4, bidirectional=True)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 5)), jnp.float32)
  params = model.init(KEY, x)["params"]
  p = jax.tree.map(np.asarray, params)

  def run(cell, steps):
    h = np.zeros((2, 4), np.float32)
    for t in steps:
      h = np.tanh(np.asarray(x)[:, t] @ cell["i"]["kernel"] + cell["i"]["bias"]
                  + h @ cell["h"]["kernel"])
    return h

  h = np.concatenate([run(p["layer0_forward"], range(6)),
                      run(p["layer0_backward"], reversed(range(6)))], -1)
  want = h @ p["head"]["kernel"] + p["head"]["bias"]
  np.testing.assert_allclose(model.apply({"params": params}, x), want, atol=1e-5)


def test_carried_state_continues_the_sequence():
  """Per-step outputs equal sequence-to-one outputs on each prefix (same parameters), and
  running in two chunks with the carried state equals one run."""
  cell = "lstm"
  x = jnp.asarray(np.random.default_rng(1).integers(0, 11, (2, 8)), jnp.int32)
  lm = rnn.RNN(11, cell=cell, hidden_size=8, num_layers=2, vocab_size=11, per_step=True)
  variables = lm.init(KEY, x)
  full = lm.apply(variables, x)
  last = rnn.RNN(11, cell=cell, hidden_size=8, num_layers=2, vocab_size=11)
  for t in (4, 7):
    np.testing.assert_allclose(last.apply(variables, x[:, :t + 1]), full[:, t], atol=1e-5)
  head, carries = lm.apply(variables, x[:, :5], return_carries=True)
  tail = lm.apply(variables, x[:, 5:], carries=carries)
  np.testing.assert_allclose(jnp.concatenate([head, tail], 1), full, atol=1e-5)


def test_tiny_lstm_overfits_a_fixed_batch():
  lm = rnn.RNN(13, cell="lstm", hidden_size=32, vocab_size=13, embed_dim=16, per_step=True)
  x = jnp.asarray(np.random.default_rng(7).integers(0, 13, (8, 16)), jnp.int32)
  losses = next_token_losses(lm, x, 3e-2)
  first, loss = losses[0], losses[-1]
  assert first > 2.0 and loss < 0.1 * first


def test_images_are_read_row_by_row():
  """An NHWC image is a sequence of H rows of W*C features, for the RNN and the Transformer."""
  from deepflow.models.transformer import TransformerEncoder
  images = jnp.arange(2 * 8 * 8 * 1, dtype=jnp.float32).reshape(2, 8, 8, 1) / 100
  for model in (rnn.RNN(num_outputs=10, hidden_size=8),
                TransformerEncoder(num_outputs=10, d_model=16, num_heads=2, num_layers=1,
                                   mlp_dim=16)):
    variables = model.init(jax.random.PRNGKey(0), images)
    out = model.apply(variables, images)
    assert out.shape == (2, 10)
    rows = model.apply(variables, images.reshape(2, 8, 8))
    np.testing.assert_allclose(out, rows, atol=1e-6)
