"""The sharded train step against references: one device, and classic pmap + pmean."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from deepflow import parallel
from deepflow.data.pipeline import INPUTS, TARGETS, Pipeline
from deepflow.registry import TASKS
from deepflow.train.state import create_state
from deepflow.train.step import compile_steps
from tests.helpers import grads_of, tiny_config, update_of


def setup(microbatches=1, **model):
  config = tiny_config(f"train.microbatches={microbatches}",
                       model=dict(name="mlp", hidden=(32, 16), **model))
  pipeline = Pipeline(config)
  task = TASKS.get("classification")(config, pipeline.spec)
  tx = update_of(task).tx
  it = pipeline.train_iterator()
  batches = [next(it) for _ in range(3)]
  return config, task, tx, batches


def run_sharded(task, tx, batches, devices, microbatches=1, parallel_config=None, model_axis=1):
  mesh = Mesh(np.asarray(devices).reshape(len(devices) // model_axis, model_axis),
              ("data", "model"))
  state = create_state(update_of(task), tx, seed=0)
  shardings = parallel.state_shardings(state, mesh, parallel_config or task.config.parallel)
  state = jax.device_put(state, shardings)
  update = dataclasses.replace(update_of(task), tx=tx, microbatches=microbatches)
  train_step, _ = compile_steps(update, mesh, shardings)
  for b in batches:
    state, _ = train_step(state, parallel.global_batch(b, mesh))
  run_sharded.last_state = state
  return jax.device_get(state.params)


def assert_trees_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def test_eight_devices_equal_one_device():
  _, task, tx, batches = setup()
  assert len(jax.devices()) == 8
  one = run_sharded(task, tx, batches, jax.devices()[:1])
  eight = run_sharded(task, tx, batches, jax.devices())
  assert_trees_close(one, eight, 1e-5)
  start = jax.device_get(create_state(update_of(task), tx, seed=0).params)
  assert not np.allclose(jax.tree.leaves(start)[0], jax.tree.leaves(one)[0])  # it trained


def test_equals_pmap_pmean_reference():
  """Classic data parallelism written by hand: per-device gradients averaged with pmean."""
  _, task, tx, batches = setup()
  n = jax.device_count()
  params = create_state(update_of(task), tx, seed=0).params
  opt_state = tx.init(params)

  def loss_fn(p, x, y):
    logits = task.model.apply({"params": p}, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(p, s, x, y):
    grads = jax.lax.pmean(jax.grad(loss_fn)(p, x, y), "batch")
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  pstep = jax.pmap(step, axis_name="batch")
  replicate = lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), t)  # noqa
  p, s = replicate(params), replicate(opt_state)
  for b in batches:
    x = b[INPUTS].reshape(n, -1, *b[INPUTS].shape[1:])
    y = b[TARGETS].astype(np.int32).reshape(n, -1)
    p, s = pstep(p, s, x, y)
  reference = jax.tree.map(lambda x: x[0], jax.device_get(p))
  ours = run_sharded(task, tx, batches, jax.devices())
  assert_trees_close(reference, ours, 1e-5)


def test_microbatches_equal_the_large_batch_step():
  _, task, tx, batches = setup()
  whole = run_sharded(task, tx, batches, jax.devices())
  accumulated = run_sharded(task, tx, batches, jax.devices(), microbatches=4)
  assert_trees_close(whole, accumulated, 1e-5)


def test_nonfinite_update_is_not_applied():
  _, task, tx, batches = setup()
  mesh = Mesh(np.asarray(jax.devices()).reshape(8, 1), ("data", "model"))
  state = create_state(update_of(task), tx, seed=0)
  shardings = parallel.state_shardings(state, mesh, task.config.parallel)
  train_step, _ = compile_steps(update_of(task), mesh, shardings)
  bad = dict(batches[0])
  bad[INPUTS] = np.full_like(bad[INPUTS], np.nan)
  before = jax.device_get(state.params)
  state, metrics = train_step(jax.device_put(state, shardings), parallel.global_batch(bad, mesh))
  assert float(metrics["nonfinite"]) == 1.0 and int(state.step) == 1
  assert int(state.nonfinite) == 1
  assert_trees_close(before, jax.device_get(state.params), 0.0)


def test_fsdp_shards_params_and_optimizer_state_and_matches_data_parallel():
  config, task, tx, batches = setup()
  fsdp = config.parallel.copy_and_resolve_references()
  with fsdp.unlocked():
    fsdp.strategy, fsdp.fsdp_min_size = "fsdp", 256
  dp = run_sharded(task, tx, batches, jax.devices())
  sharded = run_sharded(task, tx, batches, jax.devices(), parallel_config=fsdp)
  assert_trees_close(dp, sharded, 1e-5)
  state = run_sharded.last_state
  kernel = state.params["Dense_0"]["kernel"]  # (64, 32): split along its 64 rows
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("data", None)
  assert {s.data.shape for s in kernel.addressable_shards} == {(8, 32)}
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == kernel.shape]
  assert moments and all(m.sharding.spec == kernel.sharding.spec for m in moments)
  assert state.params["Dense_0"]["bias"].sharding.spec == jax.sharding.PartitionSpec(None)


def test_model_axis_splits_dense_outputs_and_matches_data_parallel():
  config, task, tx, batches = setup()
  dp = run_sharded(task, tx, batches, jax.devices())
  tp = run_sharded(task, tx, batches, jax.devices(), model_axis=2)
  assert_trees_close(dp, tp, 1e-5)
  kernel = run_sharded.last_state.params["Dense_1"]["kernel"]  # (32, 16)
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "model")


def test_bfloat16_compute_keeps_float32_master_params_and_converges():
  config = tiny_config("train.compute_dtype=bfloat16", "train.steps=60",
                       model=dict(name="mlp", hidden=(64,)))
  pipeline = Pipeline(config)
  task = TASKS.get("classification")(config, pipeline.spec)
  tx = update_of(task).tx
  state = create_state(update_of(task), tx, seed=0)
  batch = jax.tree.map(jnp.asarray, next(pipeline.train_iterator()))
  jaxpr = jax.make_jaxpr(lambda p: task.loss(p, {}, batch, jax.random.PRNGKey(0))[0])(
      state.params)
  dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
  grads, _, _ = grads_of(task)(state.params, {}, batch, jax.random.PRNGKey(0))
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  mesh = Mesh(np.asarray(jax.devices()).reshape(8, 1), ("data", "model"))
  shardings = parallel.state_shardings(state, mesh, config.parallel)
  train_step, eval_step = compile_steps(update_of(task), mesh, shardings)
  state = jax.device_put(state, shardings)
  it, in_flight = pipeline.train_iterator(), parallel.DispatchWindow()
  for _ in range(config.train.steps):
    state, metrics = train_step(state, next(it))
    in_flight.add(metrics)  # as the loop does: unbounded run-ahead deadlocks XLA:CPU collectives
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
  accuracy = np.mean([eval_step(state, b)["accuracy"][b["mask"] > 0].mean()
                      for b in pipeline.eval_batches("test")])
  assert accuracy > 0.9


def test_a_metric_window_fetched_at_once_equals_each_step_fetched_alone():
  window = [{"loss": jnp.float32(i) / 3, "nonfinite": jnp.float32(i % 2),
             "hist": jnp.arange(3) * i} for i in range(5)]
  host = parallel.window_to_host(window)
  assert len(host) == 5 and parallel.window_to_host([]) == []
  for got, want in zip(host, parallel.to_host(window)):
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
      assert np.asarray(got[key]).dtype == np.asarray(want[key]).dtype
