"""The sharded train step against references: one device, and classic pmap + pmean."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from deepflow import parallel
from deepflow.data.pipeline import INPUTS, TARGETS, Pipeline
from deepflow.registry import TASKS
from deepflow.train.state import create_state
from deepflow.train.step import compile_steps, state_shardings
from tests.helpers import tiny_config


def setup(microbatches=1, **model):
  config = tiny_config(f"train.microbatches={microbatches}",
                       model=dict(name="mlp", hidden=(32, 16), **model))
  pipeline = Pipeline(config)
  task = TASKS.get("classification")(config, pipeline.spec)
  tx = task.optimizer(config.train.steps)
  it = pipeline.train_iterator()
  batches = [next(it) for _ in range(3)]
  return config, task, tx, batches


def run_sharded(task, tx, batches, devices, microbatches=1):
  mesh = Mesh(np.asarray(devices).reshape(len(devices), 1), ("data", "model"))
  state = create_state(task, tx, seed=0)
  shardings = state_shardings(state, mesh)
  state = jax.device_put(state, shardings)
  train_step, _ = compile_steps(task, tx, mesh, shardings, microbatches)
  for b in batches:
    state, _ = train_step(state, parallel.global_batch(b, mesh))
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
  start = jax.device_get(create_state(task, tx, seed=0).params)
  assert not np.allclose(jax.tree.leaves(start)[0], jax.tree.leaves(one)[0])  # it trained


def test_equals_pmap_pmean_reference():
  """Classic data parallelism written by hand: per-device gradients averaged with pmean."""
  _, task, tx, batches = setup()
  n = jax.device_count()
  params = create_state(task, tx, seed=0).params
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
  state = create_state(task, tx, seed=0)
  shardings = state_shardings(state, mesh)
  train_step, _ = compile_steps(task, tx, mesh, shardings)
  bad = dict(batches[0])
  bad[INPUTS] = np.full_like(bad[INPUTS], np.nan)
  before = jax.device_get(state.params)
  state, metrics = train_step(jax.device_put(state, shardings), parallel.global_batch(bad, mesh))
  assert float(metrics["nonfinite"]) == 1.0 and int(state.step) == 1
  assert int(state.nonfinite) == 1
  assert_trees_close(before, jax.device_get(state.params), 0.0)
