"""Ghost clipping (per-example norms from layer inputs and output gradients) against the vmapped
per-example gradients it replaces: the same norms and clipped sums, model by model."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepflow import privacy
from deepflow.data.pipeline import INPUTS, MASK, TARGETS, Pipeline
from deepflow.models.cnn import CNN
from deepflow.models import lora
from deepflow.models.layers import ClassToken, PositionalEmbedding
from deepflow.models.mlp import MLP
from deepflow.models.transformer import TransformerEncoder, TransformerLM
from deepflow.models.vit import ViT
from deepflow.privacy import ghost, ghost_layers, token_norms
from deepflow.registry import ConfigError, TASKS
from deepflow.train.state import create_state
from deepflow.train.step import gradient_fn
from tests.helpers import grads_of, tiny_config, update_of
from tests.tasks.test_language import lm_config
from tests.numerics import assert_same_math

B = 12


class ConvVariants(nn.Module):
  """Convolutions off the beaten path: strided, dilated, explicit padding, no bias, 1-D."""
  num_outputs: int

  @nn.compact
  def __call__(self, x, *, train=False):
    x = nn.relu(nn.Conv(3, (3, 2), strides=(2, 1), padding="VALID", use_bias=False)(x))
    x = nn.relu(nn.Conv(4, (2, 2), kernel_dilation=2, padding=((1, 2), (0, 1)))(x))
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    x = nn.Conv(5, (3,), padding="SAME")(x)  # 1-D over the flattened positions
    return nn.Dense(self.num_outputs)(x.reshape(x.shape[0], -1))


class BagOfTokens(nn.Module):
  """An embedding, a Dense applied at every position and a Dense called twice (shared)."""
  num_outputs: int

  @nn.compact
  def __call__(self, ids, *, train=False):
    h = jnp.tanh(nn.Dense(6)(nn.Embed(20, 8)(ids)))
    shared = nn.Dense(6)
    h = shared(jnp.tanh(shared(h)))
    return nn.Dense(self.num_outputs)(h.mean(-2))


class Uncovered(nn.Module):
  """Layers ghost clipping leaves to per-example gradients: a tied output embedding
  (``attend``), a scanned LSTM and a rematerialized Dense; plus covered ones."""
  num_outputs: int

  @nn.compact
  def __call__(self, ids, *, train=False):
    embed = nn.Embed(20, 6)
    h = nn.LayerNorm()(embed(ids))
    h = nn.RNN(nn.OptimizedLSTMCell(6))(h)
    h = nn.remat(nn.Dense)(6)(h) + nn.Dense(6)(h)
    return nn.Dense(self.num_outputs)(embed.attend(h).mean(-2))


def _problem(model, inputs):
  """Parameters, a batch with two padding rows, and a per-example loss with dropout keys (a
  language model's: next-token cross-entropy averaged over positions)."""
  params = model.init(jax.random.key(0), inputs[:1])["params"]
  batch = {"x": inputs, "y": jnp.arange(len(inputs)) % 3, MASK: jnp.ones(len(inputs)).at[-2:].set(0)}

  def loss(p, example, key):
    logits = model.apply({"params": p}, example["x"][None], train=True, rngs={"dropout": key})
    if isinstance(model, TransformerLM):
      targets = example["x"][None, 1:]
      nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets).mean()
    else:
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, example["y"][None])[0]
    return example[MASK] * nll, {"logit_max": jnp.max(logits)}
  return params, batch, loss


def _assert_ghost_equals_vmap(loss, params, batch):
  """Equal norms, losses, aux and clipped sums, at a clip norm that clips about half."""
  run = jax.jit(lambda clipping, clip: privacy.clipped_gradient_sum(
      loss, params, batch, jax.random.key(1), clip_norm=clip, clipping=clipping),
      static_argnums=0)
  clip = float(np.median(run("vmap", np.inf)[1]["grad_norms"][:-2]))
  (g_ref, aux_ref), (g_ghost, aux_ghost) = run("vmap", clip), run("ghost", clip)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
  close(aux_ghost["grad_norms"], aux_ref["grad_norms"])
  norms = np.asarray(aux_ref["grad_norms"])
  assert (norms[-2:] == 0).all() and (norms[:-2] > clip).any() and (norms[:-2] < clip).any()
  assert int(aux_ghost["num_clipped"]) == int(aux_ref["num_clipped"])
  close(aux_ghost["loss"], aux_ref["loss"])
  jax.tree.map(close, aux_ghost["aux"], aux_ref["aux"])
  assert jax.tree.structure(g_ghost) == jax.tree.structure(g_ref)
  jax.tree.map(close, g_ghost, g_ref)


MODELS = {
    "mlp_dropout": (MLP(3, hidden=(16, 8), dropout=0.3), jax.random.normal(jax.random.key(2),
                                                                          (B, 4, 3))),
    # The second convolution's norms take the Gram form, the first's the direct one.
    "cnn": (CNN(3, features=(8, 32), dense=(8,)), jax.random.normal(jax.random.key(2),
                                                                    (B, 8, 8, 1))),
    "conv_variants": (ConvVariants(3), jax.random.normal(jax.random.key(2), (B, 9, 6, 2))),
    "embedding": (BagOfTokens(3), jax.random.randint(jax.random.key(2), (B, 7), 0, 20)),
    # Layer norms, attention's DenseGeneral projections, learned positions (a layer of their
    # own, or sharing the model's scope as ViT's do), class tokens.
    "transformer_lm": (TransformerLM(11, vocab_size=11, d_model=8, num_heads=2, num_layers=1,
                                     mlp_dim=16, max_len=9, dropout=0.1),
                       jax.random.randint(jax.random.key(2), (B, 7), 0, 11)),
    # The blocks under nn.scan: offsets and kept inputs cross the scan stacked on the layer axis.
    "transformer_lm_scanned": (TransformerLM(11, vocab_size=11, d_model=8, num_heads=2,
                                             num_layers=2, mlp_dim=16, max_len=9, dropout=0.1,
                                             scan_layers=True),
                               jax.random.randint(jax.random.key(2), (B, 7), 0, 11)),
    "transformer_encoder_cls": (TransformerEncoder(3, vocab_size=20, d_model=8, num_heads=2,
                                                   num_layers=1, mlp_dim=16, max_len=9,
                                                   pooling="cls"),
                                jax.random.randint(jax.random.key(2), (B, 7), 0, 20)),
    "vit_cls": (ViT(3, patch_size=2, d_model=8, num_heads=2, num_layers=1, mlp_dim=16),
                jax.random.normal(jax.random.key(2), (B, 4, 4, 1))),
}


@pytest.mark.parametrize("name", MODELS)
def test_ghost_equals_per_example_gradients_on_covered_layers(name):
  params, batch, loss = _problem(*MODELS[name])
  the_plan = ghost.plan(loss, params, jax.tree.map(lambda x: x[0], batch), jax.random.key(0))
  assert the_plan.complete  # every parameter is in a covered layer: 'auto' picks ghost
  _assert_ghost_equals_vmap(loss, params, batch)


def test_both_forms_of_a_convolutions_norms_equal_its_per_example_gradients():
  """Strided, dilated, explicitly padded, 1-D, and two images per example."""
  cases = [(nn.Conv(4, (3, 2), strides=(2, 1), padding="VALID", use_bias=False), (1, 9, 6, 2)),
           (nn.Conv(4, (2, 2), kernel_dilation=2, padding=((1, 2), (0, 1))), (1, 5, 6, 3)),
           (nn.Conv(5, (3,), padding="SAME"), (1, 7, 3)),
           (nn.Conv(4, (3, 3), strides=2), (2, 7, 7, 2))]
  for layer, shape in cases:
    x = jax.random.normal(jax.random.key(0), (B, *shape))
    params = layer.init(jax.random.key(1), x[0])["params"]
    g = jax.random.normal(jax.random.key(2), (B, *layer.apply({"params": params}, x[0]).shape))
    spec = ghost_layers.layer_spec(layer, "__call__", {})

    @jax.jit
    def norms(x, g):
      grad = jax.vmap(lambda xi, gi: jax.vjp(
          lambda p: layer.apply({"params": p}, xi), params)[1](gi)[0]["kernel"])(x, g)
      return (jnp.sum(jnp.square(grad), axis=tuple(range(1, grad.ndim))),
              spec.kernel_sq_norms(x, g, "direct"), spec.kernel_sq_norms(x, g, "gram"))
    reference, direct, gram = norms(x, g)
    np.testing.assert_allclose(direct, reference, rtol=1e-5)
    np.testing.assert_allclose(gram, reference, rtol=1e-5)


def _one_example(tree, i):
  return jax.tree.map(lambda a: a[i] if isinstance(a, jax.Array) else a, tree)


# Per-example layer calls: a layer, then each call's (args, kwargs), every array with a leading
# example axis (a layer called twice shares its parameters).
X = jax.random.normal(jax.random.key(3), (B, 1, 5, 8)) * 2 + 1
SPECS = {
    "layer_norm": (nn.LayerNorm(), [((X,), {}), ((X[..., ::-1] - 2,), {})]),
    "layer_norm_exact_variance_no_bias": (
        nn.LayerNorm(epsilon=1e-2, use_fast_variance=False, use_bias=False), [((X,), {})]),
    "rms_norm": (nn.RMSNorm(), [((X,), {})]),
    "dense_general_qkv": (nn.DenseGeneral((3, 2, 4)), [((X,), {})]),
    "dense_general_out": (nn.DenseGeneral(6, axis=(-2, -1)), [((X.reshape(B, 1, 5, 2, 4),), {})]),
    "positions_offset": (PositionalEmbedding("learned", 9), [((X, jnp.full(B, 3)), {})]),
    "positions_clamped_offset": (PositionalEmbedding("learned", 9), [((X, jnp.full(B, 7)), {})]),
    "positions_given": (PositionalEmbedding("learned", 9), [
        ((X,), {"positions": jax.random.randint(jax.random.key(4), (B, 1, 5), 0, 9)})]),
    "class_token": (ClassToken(), [((X,), {}), ((X[:, :, :3],), {})]),
}


@pytest.mark.parametrize("name", SPECS)
def test_a_layer_specs_norms_and_clipped_sum_equal_its_per_example_gradients(name):
  """Each example's squared gradient norm and the factor-weighted sum of their gradients, from
  the layer's captured inputs and output gradients, against vmapped ``jax.vjp``."""
  layer, calls = SPECS[name]
  spec = ghost_layers.layer_spec(layer, "__call__", calls[0][1])
  assert spec is not None
  params = layer.init(jax.random.key(1), *_one_example(calls[0], 0)[0],
                      **_one_example(calls[0], 0)[1])["params"]
  assert set(params) == set(spec.param_names)
  outs = [jax.eval_shape(lambda c: layer.apply({"params": params}, *c[0], **c[1]),
                         _one_example(call, 0)) for call in calls]
  grads = [jax.random.normal(jax.random.key(5 + i), (B, *out.shape)) for i, out in enumerate(outs)]
  factors = jax.random.uniform(jax.random.key(9), (B,))

  @jax.jit
  def reference():
    def example_grad(i):
      _, pullback = jax.vjp(lambda p: [layer.apply({"params": p}, *a, **k) for a, k in
                                       _one_example(calls, i)], params)
      return pullback([g[i] for g in grads])[0]
    per_example = jax.vmap(example_grad)(jnp.arange(B))
    sq = sum(jnp.sum(jnp.square(g).reshape(B, -1), axis=1) for g in jax.tree.leaves(per_example))
    return sq, jax.tree.map(lambda g: jnp.tensordot(factors, g, axes=1), per_example)

  @jax.jit
  def ghost_clipping():
    captured = [jax.vmap(lambda a, k: spec.capture(a, k))(*call) for call in calls]
    return (ghost_layers.sq_norms(spec, captured, grads),
            ghost_layers.clipped_sum(spec, captured, grads, factors, params))
  (sq_ref, sum_ref), (sq, summed) = reference(), ghost_clipping()
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
  close(sq, sq_ref)
  jax.tree.map(close, summed, sum_ref)


@pytest.mark.parametrize("clipping", ["ghost", "vmap"])
def test_skipping_a_poisson_batchs_padding_rows_changes_nothing(clipping):
  """Rows from ``head`` on, computed only when the mask says one is real: the same sums, losses,
  norms and real rows' aux as the whole batch at once, whether they are computed (head 6) or
  skipped (head 10; the two padding rows' aux are then zeros)."""
  params, batch, loss = _problem(*MODELS["mlp_dropout"])

  def run(head):
    return jax.jit(lambda: privacy.clipped_gradient_sum(
        loss, params, batch, jax.random.key(1), clip_norm=0.5, clipping=clipping,
        mask=batch[MASK], head=head))()
  whole = run(0)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
  for head in (6, 10):
    grads, aux = run(head)
    jax.tree.map(close, grads, whole[0])
    for key in ("loss", "grad_norms", "num_clipped"):
      close(aux[key], whole[1][key])
    close(aux["aux"]["logit_max"][:-2], whole[1]["aux"]["logit_max"][:-2])
  assert "cond" in str(jax.make_jaxpr(lambda: privacy.clipped_gradient_sum(
      loss, params, batch, jax.random.key(1), clip_norm=0.5, mask=batch[MASK], head=10))())


def test_uncovered_layers_get_per_example_gradients_and_auto_keeps_vmap():
  params, batch, loss = _problem(Uncovered(3),
                                 jax.random.randint(jax.random.key(2), (B, 5), 0, 20))
  the_plan = ghost.plan(loss, params, jax.tree.map(lambda x: x[0], batch), jax.random.key(0))
  uncovered = {"/".join(path) for path in the_plan.uncovered}
  lstm = {path for path in uncovered if path.startswith("OptimizedLSTMCell_0/")}
  assert len(lstm) == 12  # 4 gates x (input kernel, hidden kernel, bias): all inside the scan
  assert uncovered - lstm == {"Embed_0/embedding", "CheckpointDense_0/kernel",
                              "CheckpointDense_0/bias"}
  assert {call.path for call in the_plan.calls} == {("LayerNorm_0",), ("Dense_0",), ("Dense_1",)}
  _assert_ghost_equals_vmap(loss, params, batch)


def test_lora_adapters_beside_a_covered_kernel_get_per_example_gradients():
  """A covered layer claims only its spec's leaves: the adapters merged into its kernel before
  ``apply`` are read through that kernel, so they are materialized and the kernel stays ghost."""
  params, batch, loss = _problem(*MODELS["mlp_dropout"])
  adapters = lora.LoraConfig(rank=2, alpha=1.0, targets="Dense_0/kernel$")
  params = lora.add_adapters(params, adapters, jax.random.key(3))
  params["Dense_0"]["lora_b"] = jax.random.normal(jax.random.key(4), (2, 16))  # not zero: moved
  merged_loss = lambda p, example, key: loss(lora.merge(p, adapters), example, key)  # noqa: E731
  the_plan = ghost.plan(merged_loss, params, jax.tree.map(lambda x: x[0], batch),
                        jax.random.key(0))
  assert set(the_plan.uncovered) == {("Dense_0", "lora_a"), ("Dense_0", "lora_b")}
  assert ("Dense_0",) in {call.path for call in the_plan.calls}
  _assert_ghost_equals_vmap(merged_loss, params, batch)


def _task_grads(config, clipping):
  config.unlock()
  config.privacy.clipping = clipping
  config.lock()
  task = TASKS.get(config.task.name)(config, Pipeline(config).spec)
  update = update_of(task)
  params = create_state(update, update.tx, seed=0).params
  batch = next(Pipeline(config).train_iterator())
  return jax.jit(gradient_fn(update))(params, {}, batch, jax.random.key(4)), batch


PRIVATE = ("privacy.enabled=True", "privacy.noise_multiplier=1.0", "privacy.clip_norm=0.1")
TASK_CONFIGS = {
    "mlp": lambda data_dir: tiny_config(*PRIVATE, "model.dropout=0.1"),
    "digits_cnn": lambda data_dir: tiny_config(
        *PRIVATE, model=dict(name="cnn", features=(4, 8), dense=(16,), dropout=0.1)),
    "lstm_lm": lambda data_dir: lm_config(data_dir, *PRIVATE, "data.batch_size=8", model=dict(
        name="rnn", cell="lstm", hidden_size=8, num_layers=1, embed_dim=8, per_step=True)),
    "transformer_lm_scanned": lambda data_dir: lm_config(data_dir, *PRIVATE, "data.batch_size=8",
                                                         "model.scan_layers=True"),
}


@pytest.mark.parametrize("name", TASK_CONFIGS)
def test_the_private_train_step_is_the_same_with_ghost_clipping(name, data_dir, monkeypatch):
  """Through the train step's gradient on Poisson-sampled, padded batches, noise included (same
  key); every parameter covered but the LSTM's (its cells run inside ``nn.RNN``'s scan, which
  keeps nothing for ghost clipping)."""
  (ref, _, ref_metrics), batch = _task_grads(TASK_CONFIGS[name](data_dir), "vmap")
  plans, plan = [], ghost.plan
  monkeypatch.setattr(ghost, "plan", lambda *args: plans.append(plan(*args)) or plans[-1])
  (got, _, metrics), _ = _task_grads(TASK_CONFIGS[name](data_dir), "ghost")
  assert plans and all(p.complete != name.startswith("lstm") for p in plans)
  assert 0 < float(np.sum(batch[MASK])) < len(batch[MASK])  # padding rows are present
  assert float(ref_metrics["privacy/clipped_fraction"]) > 0  # factors depend on the norms
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, got, ref)
  jax.tree.map(close, metrics, ref_metrics)


FROZEN = ("optimizer.freeze=^Dense_0/",)
FROZEN_MLP = dict(name="mlp", hidden=(16, 8))


def _trained_example_grads(model, params, batch, trained):
  """Plain vmapped per-example gradients of the whole tree (padding rows zero), restricted to
  the ``trained`` layers, and their global norms: the reference for freezing under DP-SGD."""
  def example_loss(p, x, y, real):
    logits = model.apply({"params": p}, x[None], train=False)
    return real * optax.softmax_cross_entropy_with_integer_labels(logits, y[None])[0]
  per_example = jax.vmap(jax.grad(example_loss), (None, 0, 0, 0))(
      params, batch[INPUTS], batch[TARGETS].astype(jnp.int32), batch[MASK])
  kept = {layer: per_example[layer] for layer in trained}
  squares = [jnp.sum(jnp.square(g).reshape(g.shape[0], -1), 1) for g in jax.tree.leaves(kept)]
  return kept, jnp.sqrt(sum(squares))


@pytest.mark.parametrize("clipping", ["vmap", "ghost"])
def test_frozen_parameters_enter_neither_the_clipping_norms_nor_the_noise(clipping):
  """With ``optimizer.freeze``, each example's norm and the clipped sum are those of its
  gradient w.r.t. the trained parameters alone; the frozen ones get no gradient and no noise,
  and the trained ones the configured noise std (sigma C / B)."""
  spec = Pipeline(tiny_config(*PRIVATE, *FROZEN, model=FROZEN_MLP)).spec
  config = lambda *more: tiny_config(*PRIVATE, *FROZEN, f"privacy.clipping='{clipping}'",  # noqa
                                     *more, model=FROZEN_MLP)
  task = TASKS.get("classification")(config(), spec)
  update = update_of(task, 8)
  params = create_state(update, update.tx, seed=0).params
  batch = next(Pipeline(config()).train_iterator())
  trained = ("Dense_1", "Dense_2")
  kept, norms = jax.jit(functools.partial(_trained_example_grads, task.model, trained=trained))(
      params, batch)
  real = np.asarray(batch[MASK]) > 0
  clip = float(np.median(norms[real]))

  def private_grads(noise):
    task = TASKS.get("classification")(
        config(f"privacy.clip_norm={clip}", f"privacy.noise_multiplier={noise}"), spec)
    return jax.jit(grads_of(task))(params, {}, batch, jax.random.key(4))
  (grads, _, metrics), (noisy, _, _) = private_grads(0.0), private_grads(1.0)

  factors = np.where(norms > clip, clip / np.maximum(norms, 1e-30), 1.0)
  expected = jax.tree.map(lambda g: np.tensordot(factors, g, 1) / 32, kept)
  close = assert_same_math
  jax.tree.map(close, {layer: grads[layer] for layer in trained}, expected)
  close(metrics["privacy/example_grad_norm"], np.mean(norms[real]))
  close(metrics["privacy/clipped_fraction"], np.mean(norms[real] > clip))
  for tree in (grads, noisy):
    assert not any(np.any(leaf) for leaf in jax.tree.leaves(tree["Dense_0"]))
  noise = np.concatenate([np.ravel(noisy[layer][name] - grads[layer][name])
                          for layer in trained for name in ("kernel", "bias")])
  assert np.std(noise) == pytest.approx(clip / 32, rel=0.15)


def test_an_unknown_clipping_is_a_config_error():
  with pytest.raises(ConfigError, match="privacy.clipping"):
    tiny_config("privacy.enabled=True", "privacy.clipping='fast'")


@pytest.mark.parametrize("vocab", [5, 1000], ids=["repeated", "mostly_distinct"])
def test_both_forms_of_token_norms_equal_per_example_table_gradients(vocab):
  layer = nn.Embed(vocab, 16)
  # Negative ids read row vocab + id, as jnp.take does: -1 and vocab - 1 are the same row.
  ids = jax.random.randint(jax.random.key(0), (B, 40), -2, vocab)
  params = layer.init(jax.random.key(1), ids[0])["params"]
  g = jax.random.normal(jax.random.key(2), (B, 40, 16))
  spec = ghost_layers.layer_spec(layer, "__call__", {})

  @jax.jit
  def norms(ids, g):
    grad = jax.vmap(lambda i, gi: jax.vjp(
        lambda p: layer.apply({"params": p}, i), params)[1](gi)[0]["embedding"])(ids, g)
    rows, g = ghost_layers._tokens(spec, [ids], [g])
    return (jnp.sum(jnp.square(grad), axis=(1, 2)), ghost_layers.sq_norms(spec, [ids], [g]),
            token_norms.sq_norms(rows, g, "gram"),
            token_norms.sq_norms(rows, g, "runs"))
  reference, default, gram, runs = norms(ids, g)
  for norm in (default, gram, runs):
    np.testing.assert_allclose(norm, reference, rtol=1e-5)


def test_token_norms_by_runs_stay_split_over_a_sharded_batch():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("batch",))
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
  ids = jax.ShapeDtypeStruct((4, 64), jnp.int32, sharding=batch)
  g = jax.ShapeDtypeStruct((4, 64, 8), jnp.float32, sharding=batch)
  runs = jax.jit(lambda i, x: token_norms.sq_norms(i, x, "runs"))
  assert "all-reduce" not in runs.lower(ids, g).compile().as_text()


def test_a_long_sequence_takes_the_runs_form_and_still_equals_vmap(monkeypatch):
  # The language model's tokens and learned positions at a size that picks the runs form.
  monkeypatch.setattr(token_norms, "RUNS_MIN_SIZE", 1)
  params, batch, loss = _problem(*MODELS["transformer_lm"])
  _assert_ghost_equals_vmap(loss, params, batch)
  # platform_dependent traces every branch; the compiled CPU program keeps only its own, and
  # only the runs form sorts.
  def cpu_program():  # a new function each time: a jit of the same one would reuse its trace
    ids, g = jnp.zeros((2, 8), jnp.int32), jnp.ones((2, 8, 4))
    return jax.jit(lambda i, x: token_norms.sq_norms(i, x)).lower(ids, g).compile().as_text()
  assert "sort" in cpu_program()
  monkeypatch.setattr(token_norms, "RUNS_MIN_SIZE", 10**9)
  assert "sort" not in cpu_program()
