"""DP-SGD through the real train step and loop: equivalence, clipping, noise, accounting, errors."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import dp_accounting
import jax
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

import deepflow
import deepflow.privacy
from deepflow import parallel
from deepflow.data.pipeline import MASK, Pipeline
from deepflow.privacy import accounting
from deepflow.registry import ConfigError, TASKS
from deepflow.train import checkpoint as checkpoint_lib
from deepflow.train.experiment import Experiment
from deepflow.train.state import create_state
from deepflow.train.step import compile_steps, gradient_fn
from deepflow.train.writers import read_metrics
from tests.helpers import tiny_config, update_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SIZE, BATCH = 2048, 32  # synthetic:digits_like and tiny_config
PRIVATE = ("privacy.enabled=True",)
# The same fixed-size batches as a non-private run, for comparisons batch by batch.
SHUFFLED = (*PRIVATE, "privacy.sampling='shuffle'")


def final_params(config, workdir):
  """Trains with the real loop, then restores the checkpoint it ended on."""
  deepflow.train_and_evaluate(config, workdir)
  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
  try:
    state, _, _ = Experiment(config, workdir).restore(checkpointer)
  finally:
    checkpointer.close()
  return jax.device_get(state.params)


def assert_trees_close(a, b, atol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def test_compute_epsilon_is_public_and_is_the_accountant():
  assert deepflow.privacy.compute_epsilon is accounting.compute_epsilon  # one implementation
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(dp_accounting.PoissonSampledDpEvent(
      0.01, dp_accounting.GaussianDpEvent(1.3)), 500)
  assert deepflow.privacy.compute_epsilon(1.3, 0.01, 500, 1e-5) == pytest.approx(
      accountant.get_epsilon(1e-5))


def test_no_noise_and_huge_clip_trains_like_the_ordinary_step(tmp_path):
  """Also with gradient accumulation: clipped sums over micro-batches add up exactly."""
  steps = ("train.steps=4", "model.dropout=0.0")
  ordinary = final_params(tiny_config(*steps), str(tmp_path / "ordinary"))
  for microbatches in (1, 2):
    private = final_params(tiny_config(*steps, *SHUFFLED, "privacy.clip_norm=1e6",
                                       f"train.microbatches={microbatches}"),
                           str(tmp_path / f"private{microbatches}"))
    assert_trees_close(private, ordinary)
  update = _update(tiny_config())
  start = jax.device_get(create_state(update, update.tx, seed=0).params)
  assert not np.allclose(jax.tree.leaves(start)[0], jax.tree.leaves(ordinary)[0])  # it trained


def _update(config):
  """What the experiment of ``config`` assembles around its task (``train.update``)."""
  return update_of(TASKS.get(config.task.name)(config, Pipeline(config).spec))


def test_small_clip_norm_clips_every_example_and_logs_it(tmp_path):
  clip = 1e-3
  config = tiny_config(*SHUFFLED, f"privacy.clip_norm={clip}", "train.steps=2",
                       "train.log_every=1")
  deepflow.train_and_evaluate(config, str(tmp_path))
  train = [r for r in read_metrics(str(tmp_path)) if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2]
  for record in train:
    assert record["privacy/clipped_fraction"] == 1.0
    assert record["privacy/example_grad_norm"] > 100 * clip
    assert record["grad_norm"] <= clip * (1 + 1e-5)  # the mean of clipped gradients, no noise

  # Step 1's mean per-example norm, by hand: one example at a time at the initial parameters.
  update = _update(config)
  task = update.task
  params = create_state(update, update.tx, seed=config.seed).params
  batch = next(Pipeline(config).train_iterator())
  one = jax.jit(lambda p, example: optax.tree.norm(jax.grad(
      lambda p: task.loss(p, {}, jax.tree.map(lambda x: x[None], example), None)[0])(p)))
  norms = [float(one(params, jax.tree.map(lambda x: x[i], batch))) for i in range(BATCH)]
  assert train[0]["privacy/example_grad_norm"] == pytest.approx(np.mean(norms), rel=1e-4)


def test_logged_epsilon_is_the_accountants(tmp_path):
  config = tiny_config(*PRIVATE, "privacy.noise_multiplier=1.1", "train.steps=6",
                       "train.log_every=3", "train.eval_every=3", "privacy.accountant='pld'")
  final = deepflow.train_and_evaluate(config, str(tmp_path))
  records = read_metrics(str(tmp_path))
  assert {(r["split"], r["step"]) for r in records} == {("train", 3), ("train", 6), ("test", 3),
                                                      ("test", 6)}
  for record in records:
    expected = deepflow.privacy.compute_epsilon(1.1, BATCH / TRAIN_SIZE, record["step"], 1e-5,
                                                accountant="pld")
    assert record["privacy/epsilon"] == pytest.approx(expected)
    accountant = dp_accounting.pld.PLDAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(
        BATCH / TRAIN_SIZE, dp_accounting.GaussianDpEvent(1.1)), record["step"])
    assert record["privacy/epsilon"] == pytest.approx(accountant.get_epsilon(1e-5))
  assert final["privacy/epsilon"] == records[-1]["privacy/epsilon"]
  assert final["privacy/noise_multiplier"] == 1.1 and final["privacy/delta"] == 1e-5


def test_target_epsilon_calibrates_the_noise():
  config = tiny_config(*PRIVATE, "privacy.target_epsilon=2.0", "train.steps=200")
  update = _update(config)
  q = BATCH / TRAIN_SIZE
  assert update.privacy.noise_multiplier == pytest.approx(
      deepflow.privacy.noise_multiplier_for_epsilon(2.0, q, 200, 1e-5))
  assert update.extra_metrics(200)["privacy/epsilon"] == pytest.approx(2.0, rel=1e-2)
  assert update.extra_metrics(200)["privacy/epsilon"] <= 2.0


def test_a_run_that_would_exceed_the_target_refuses_to_start(tmp_path):
  config = tiny_config(*PRIVATE, "privacy.target_epsilon=1.0", "privacy.noise_multiplier=0.6",
                       "train.steps=50")
  with pytest.raises(ConfigError, match=r"target_epsilon=1 would be exceeded.*at most \d+ steps"):
    deepflow.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def test_bad_privacy_configs_are_one_line_errors(tmp_path):
  with pytest.raises(ConfigError, match="layer or group norm"):
    _update(tiny_config(*PRIVATE, model=dict(name="resnet", stage_sizes=(1,), width=4)))
  with pytest.raises(ConfigError, match="optimizer.clip_norm=0"):
    tiny_config(*PRIVATE, "optimizer.clip_norm=1.0")
  with pytest.raises(ConfigError, match="mixes examples"):
    tiny_config(*PRIVATE, "regularizers=[{'name': 'mixup'}]")
  with pytest.raises(ConfigError, match="accountant"):
    tiny_config(*PRIVATE, "privacy.accountant='gdp'")
  with pytest.raises(ConfigError, match="below 1/train_size"):
    _update(tiny_config(*PRIVATE, "privacy.delta=0.001"))

  # From the command line: one line on stderr, no traceback.
  experiment = tmp_path / "tiny.py"
  experiment.write_text("from tests.helpers import tiny_config\n\n"
                        "def get_config():\n  return tiny_config()\n")
  out = subprocess.run(
      [sys.executable, "-m", "deepflow", "train", "--config", str(experiment), "--workdir",
       str(tmp_path / "run"), "--config.privacy.enabled=True",
       "--config.privacy.target_epsilon=0.5", "--config.privacy.noise_multiplier=0.5"],
      capture_output=True, text=True, timeout=240, cwd=ROOT,
      env={**os.environ, "PYTHONPATH": ROOT})
  assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
  errors = [line for line in out.stderr.splitlines() if line.startswith("deepflow: error:")]
  assert len(errors) == 1 and "would be exceeded" in errors[0], out.stderr


def test_micro_batches_add_the_configured_noise_once():
  """Each of n micro-batches adds noise of std sigma C / sqrt(n): the step's total is the
  configured N(0, (sigma C)^2) on the clipped sum, as if it were added once."""
  sigma, clip = 2.0, 1.0
  for microbatches in (1, 4):
    grads = {}
    for noise in (0.0, sigma):
      config = tiny_config(*PRIVATE, f"privacy.noise_multiplier={noise}",
                           f"privacy.clip_norm={clip}", f"train.microbatches={microbatches}")
      update = _update(config)
      params = create_state(update, update.tx, seed=0).params
      batch = next(Pipeline(config).train_iterator())
      grads[noise], _, _ = jax.jit(gradient_fn(update))(params, {}, batch, jax.random.key(3))
    noise = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(grads[sigma]),
                                                           jax.tree.leaves(grads[0.0]))])
    assert noise.size > 2000
    assert np.std(noise) == pytest.approx(sigma * clip / BATCH, rel=0.06)
    assert abs(np.mean(noise)) < 0.1 * sigma * clip / BATCH


def test_sharded_private_step_equals_one_device():
  config = tiny_config(*PRIVATE, "privacy.noise_multiplier=1.0", "privacy.clip_norm=0.5",
                       "model.dropout=0.1")
  update = _update(config)
  iterator = Pipeline(config).train_iterator()
  batches = [next(iterator) for _ in range(3)]

  def run(devices):
    mesh = Mesh(np.asarray(devices).reshape(len(devices), 1), ("data", "model"))
    state = create_state(update, update.tx, seed=0)
    shardings = jax.tree.map(lambda _: parallel.replicated(mesh), state)
    state = jax.device_put(state, shardings)
    train_step, _ = compile_steps(update, mesh, shardings)
    for batch in batches:
      state, metrics = train_step(state, parallel.global_batch(batch, mesh))
    assert float(metrics["privacy/clipped_fraction"]) > 0  # the clip is active
    return jax.device_get(state.params)

  assert jax.device_count() == 8
  assert_trees_close(run(jax.devices()), run(jax.devices()[:1]))


def test_private_digits_experiment_runs(data_dir, tmp_path):
  path = os.path.join(ROOT, "experiments", "private_digits.py")
  spec = importlib.util.spec_from_file_location("private_digits", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  results = module.main(["--workdir", str(tmp_path), "train.steps=3", "train.log_every=1",
                         "train.progress=False", f"data.data_dir='{data_dir}'"])
  assert list(results) == list(module.VARIANTS)
  for name, metrics in results.items():
    test = metrics["test"]
    # Ten classes after 3 steps: chance 0.1, a constant guess at most 0.11; measured 0.16-0.19.
    assert test["accuracy"] > 0.13, (name, test)
    if name == "non_private":
      assert "privacy/epsilon" not in test
    else:
      target = float(name.split("_")[1])
      assert test["privacy/epsilon"] == pytest.approx(target, rel=1e-2)
  with open(os.path.join(tmp_path, "epsilon_1", "config.json")) as f:
    assert json.load(f)["privacy"]["target_epsilon"] == 1.0
  assert not math.isinf(results["epsilon_8"]["test"]["privacy/noise_multiplier"])


def test_a_poisson_batch_gives_its_real_examples_clipped_sum_over_the_expected_size():
  """Padding rows contribute nothing; the sum is divided by batch_size (the expected size), not
  by how many examples were sampled."""
  config = tiny_config(*PRIVATE, "privacy.clip_norm=1e6", "model.dropout=0.0")
  update = _update(config)
  task = update.task
  params = create_state(update, update.tx, seed=0).params
  batch = next(Pipeline(config).train_iterator())
  real = np.asarray(batch[MASK]) > 0
  assert 0 < real.sum() < len(real)  # some padding, so the check below is not vacuous
  grads, _, metrics = jax.jit(gradient_fn(update))(params, {}, batch, jax.random.key(0))
  examples = {k: v[real] for k, v in batch.items() if k != MASK}

  def summed_over_expected(p):
    return task.loss(p, {}, examples, None)[0] * real.sum() / BATCH
  assert_trees_close(grads, jax.grad(summed_over_expected)(params), atol=1e-6)
  assert float(metrics["privacy/batch_size"]) == real.sum()
  assert float(metrics["loss"]) == pytest.approx(float(task.loss(params, {}, examples, None)[0]),
                                                 rel=1e-5)


def test_the_logs_say_how_to_read_epsilon_for_each_sampling():
  poisson = _update(tiny_config(*PRIVATE, "privacy.noise_multiplier=1.0"))
  metrics = poisson.extra_metrics(8)
  assert 0 <= metrics["privacy/truncation_delta"] < 1e-2 * metrics["privacy/delta"]
  assert "privacy/epsilon_is_approximate" not in metrics
  shuffled = _update(tiny_config(*SHUFFLED, "privacy.noise_multiplier=1.0"))
  metrics = shuffled.extra_metrics(8)
  assert metrics["privacy/epsilon_is_approximate"] == 1.0
  assert "privacy/truncation_delta" not in metrics
  with pytest.raises(ConfigError, match="privacy.sampling"):
    tiny_config(*PRIVATE, "privacy.sampling='uniform'")
  with pytest.raises(ConfigError, match="max_batch_size"):
    tiny_config(*PRIVATE, "privacy.max_batch_size=20")  # below data.batch_size
