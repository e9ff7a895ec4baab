"""Transformer encoder and LM: shapes, causality, KV-cache equivalence, and a learning check.

Every model here shares one tiny size and (2, 12) inputs, so compiled ops are reused."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepflow.models import layers, transformer
from deepflow.registry import ConfigError, MODELS
from tests.helpers import next_token_losses

TINY = dict(d_model=16, num_heads=2, num_layers=2, mlp_dim=32)
VOCAB = 11

# rbg keys: their initialisers compile several times faster than threefry's on CPU
KEY = jax.random.key(0, impl="rbg")


def tokens(shape=(2, 12), seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape), jnp.int32)


def test_encoder_shapes_tokens_and_floats():
  enc = MODELS.get("transformer_encoder")(3, vocab_size=VOCAB, pooling="cls", max_len=13, **TINY)
  x = tokens()
  variables = jax.eval_shape(enc.init, KEY, x)
  assert jax.eval_shape(enc.apply, variables, x).shape == (2, 3)
  assert variables["params"]["cls"].shape == (1, 1, 16)
  enc = transformer.TransformerEncoder(1, pooling="mean", max_len=12, **TINY)  # float features
  x = jnp.ones((2, 12, 5))
  assert jax.eval_shape(enc.apply, jax.eval_shape(enc.init, KEY, x), x).shape == (2, 1)


def test_encoder_errors():
  x = tokens()
  trace = lambda model, x: jax.eval_shape(model.init, KEY, x)  # noqa: E731  (no compiling)
  with pytest.raises(ConfigError, match="pooling"):
    trace(transformer.TransformerEncoder(3, vocab_size=VOCAB, pooling="max", **TINY), x)
  with pytest.raises(ConfigError, match="max_len 8"):
    trace(transformer.TransformerEncoder(3, vocab_size=VOCAB, max_len=8, **TINY), x)
  with pytest.raises(ConfigError, match="num_heads 3"):
    trace(transformer.TransformerEncoder(3, vocab_size=VOCAB, d_model=16, num_heads=3), x)
  with pytest.raises(ConfigError, match="int tokens"):
    trace(transformer.TransformerEncoder(3, vocab_size=VOCAB, **TINY), x.astype(jnp.float32))


def test_sinusoidal_positions_formula():
  pos, dim = np.arange(7), 6
  got = np.asarray(layers.sinusoidal_positions(jnp.asarray(pos), dim))
  freqs = 1.0 / 10000 ** (np.arange(3) / 3)
  want = np.concatenate([np.sin(pos[:, None] * freqs), np.cos(pos[:, None] * freqs)], -1)
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.fixture(scope="module", params=["learned", "sinusoidal"])
def lm(request):
  model = MODELS.get("transformer_lm")(VOCAB, vocab_size=VOCAB, max_len=12,
                                       positions=request.param, **TINY)
  return model, model.init(KEY, tokens())


def test_lm_is_causal(lm):
  model, variables = lm
  x = tokens()
  logits = model.apply(variables, x)
  assert logits.shape == (2, 12, VOCAB)
  t = 4
  changed = x.at[:, t + 1:].set((x[:, t + 1:] + 1) % VOCAB)
  other = model.apply(variables, changed)
  np.testing.assert_allclose(other[:, :t + 1], logits[:, :t + 1], atol=1e-6)
  assert np.abs(other[:, t + 1:] - logits[:, t + 1:]).min(axis=-1).max() > 1e-4


def test_cached_decoding_matches_full_forward(lm):
  model, variables = lm
  x = tokens()
  full = model.apply(variables, x)
  decoder = model.clone(decode=True)
  cache = decoder.init(KEY, x[:, :3])["cache"]
  logits, state = decoder.apply({**variables, "cache": cache}, x[:, :3], mutable=["cache"])
  steps = [logits]  # a prefill of 3 tokens, then one token per call
  for i in range(3, 12):
    logits, state = decoder.apply({**variables, **state}, x[:, i:i + 1], mutable=["cache"])
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)
  assert int(state["cache"]["position"]) == 12


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_policy_recomputes_blocks_without_changing_the_model(lm, policy):
  model, variables = lm
  x = tokens()
  remat = model.clone(remat_policy=policy)
  assert (jax.tree.structure(jax.eval_shape(remat.init, KEY, x))
          == jax.tree.structure(variables))
  np.testing.assert_allclose(remat.apply(variables, x), model.apply(variables, x), atol=1e-6)
  grad = lambda m: jax.grad(lambda p: m.apply({"params": p}, x).sum())  # noqa: E731
  jaxprs = [str(jax.make_jaxpr(grad(m))(variables["params"])) for m in (model, remat)]
  assert "remat" not in jaxprs[0] and "remat" in jaxprs[1]
  if policy != "full":
    assert "policy=DotsSaveable" in jaxprs[1]
  with pytest.raises(ConfigError, match="unknown remat_policy 'most'"):
    jax.eval_shape(model.clone(remat_policy="most").init, KEY, x)


def stacked(params):
  """Unscanned parameters (block0, block1, ...) stacked as a scanned model holds them."""
  blocks = sorted(k for k in params if k.startswith("block"))
  rest = {k: v for k, v in params.items() if k not in blocks}
  return {**rest, "blocks": {"block": jax.tree.map(lambda *xs: jnp.stack(xs),
                                                   *[params[k] for k in blocks])}}


@pytest.mark.parametrize("name", ["transformer_lm", "transformer_encoder"])
def test_scanned_layers_compute_the_unscanned_model(name):
  model = MODELS.get(name)(VOCAB, vocab_size=VOCAB, max_len=12, **TINY)
  x = tokens()
  params = model.init(KEY, x)["params"]
  scanned = model.clone(scan_layers=True)
  shapes = jax.eval_shape(scanned.init, KEY, x)["params"]
  assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape,
                                                                 stacked(params))
  np.testing.assert_allclose(scanned.apply({"params": stacked(params)}, x),
                             model.apply({"params": params}, x), atol=1e-5, rtol=1e-5)


def test_scanned_lm_decodes_with_its_cache_like_the_full_pass():
  model = transformer.TransformerLM(VOCAB, vocab_size=VOCAB, max_len=12, scan_layers=True, **TINY)
  x = tokens()
  params = model.init(KEY, x)["params"]
  full = model.apply({"params": params}, x)
  decoder = model.clone(decode=True)
  cache = decoder.init(KEY, x[:, :1])["cache"]
  steps = []
  for t in range(x.shape[1]):
    logits, state = decoder.apply({"params": params, "cache": cache}, x[:, t:t + 1],
                                  mutable=["cache"])
    cache = state["cache"]
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)


def reference_attention(q, k, v, mask):
  """Softmax(q k^T / sqrt(d)) v with masked logits at float32's minimum: the formula."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_equals_the_formula_with_causal_segment_and_padding_masks(causal):
  attention = layers.SelfAttention(num_heads=2, causal=causal)
  x = jax.random.normal(jax.random.key(1), (2, 6, 8))
  segments = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 2, 2, 0, 0]])  # two documents, padding
  params = attention.init(KEY, x)["params"]
  out = attention.apply({"params": params}, x, segments)
  qkv = jnp.einsum("btd,dshe->btshe", x, params["qkv"]["kernel"]) + params["qkv"]["bias"]
  mask = np.array([[a == b for b in row] for row in segments.tolist() for a in row]).reshape(
      2, 1, 6, 6)
  if causal:
    mask = mask & jnp.tril(jnp.ones((6, 6), bool))[None, None]
  expected = reference_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask)
  expected = jnp.einsum("bthe,hed->btd", expected, params["out"]["kernel"]) + params["out"]["bias"]
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_tiny_lm_overfits_a_fixed_batch():
  model = transformer.TransformerLM(VOCAB, vocab_size=VOCAB, max_len=12,
                                    **{**TINY, "num_layers": 1})
  x = tokens((8, 13), seed=7)
  losses = next_token_losses(model, x, 1e-2)
  first, loss = losses[0], losses[-1]
  assert first > 2.0 and loss < 0.1 * first
