"""Magnitude pruning: the masks follow Zhu & Gupta's schedule (recomputed here from the formula),
pruned weights stay exactly zero, a run killed mid-schedule resumes bit-identically, and bad
options are one-line errors."""
import os
import signal
import zipfile

import jax
import numpy as np
import pytest

import deepflow
from deepflow import export, parallel, predict
from deepflow.pruning import PruningState
from deepflow.pytree import flatten
from deepflow.registry import ConfigError
from deepflow.train import loop
from deepflow.train.checkpoint import Checkpointer
from deepflow.train.experiment import Experiment
from tests.helpers import TINY, deepflow_process, experiment_text, tiny_config, write_experiment
from tests.train.test_fault_tolerance import assert_bit_identical, logged_step, wait_for_step


def pruning_state(state) -> PruningState:
  is_pruning = lambda x: isinstance(x, PruningState)  # noqa: E731
  found = [x for x in jax.tree.leaves(state.opt_state, is_leaf=is_pruning) if is_pruning(x)]
  assert len(found) == 1
  return found[0]


def schedule(step, final, start, end, frequency):
  """Zhu & Gupta's s(t) at the last step <= ``step`` where the masks were recomputed."""
  if step < start:
    return 0.0
  last = min(end, start + (step - start) // frequency * frequency)
  return final * (1 - (1 - (last - start) / (end - start)) ** 3)


def assert_masks_follow_schedule(state, final, start, end, frequency):
  step = int(state.step)
  masks = flatten(jax.device_get(pruning_state(state).masks))
  params = flatten(jax.device_get(state.params))
  for name, mask in masks.items():
    if not name.endswith("kernel"):
      assert mask.shape == () and mask, name  # not selected: never pruned
      continue
    want = round(schedule(step, final, start, end, frequency) * mask.size)
    assert np.sum(~mask) == want, (name, step)
    assert np.all(params[name][~mask] == 0), (name, step)  # pruned weights are exactly zero


def test_masks_follow_the_schedule_and_pruned_weights_stay_zero():
  """Under FSDP (kernels split over the 8 devices), each mask is sharded like its kernel."""
  prune = dict(name="pruning", sparsity=0.8, start_step=2, end_step=11, frequency=3)
  exp = Experiment(tiny_config("parallel.strategy='fsdp'", "parallel.fsdp_min_size=64",
                               regularizers=[prune], train__steps=14), None)
  state = exp.init_state()
  masks = flatten(pruning_state(state).masks)
  for name, kernel in flatten(state.params).items():
    if name.endswith("kernel"):
      assert masks[name].sharding.is_equivalent_to(kernel.sharding, kernel.ndim)
      assert not kernel.sharding.is_fully_replicated
  batch = parallel.global_batch(next(iter(exp.pipeline.eval_batches("test"))), exp.mesh)
  for _ in range(14):
    state, metrics = exp.train_step(state, batch)
    assert_masks_follow_schedule(state, 0.8, 2, 11, 3)
    kernel = flatten(jax.device_get(state.params))["Dense_0/kernel"]
    np.testing.assert_allclose(metrics["sparsity/Dense_0/kernel"], np.mean(kernel == 0))
  assert 0.79 < float(metrics["sparsity"]) < 0.81


def test_a_pruned_run_killed_mid_schedule_resumes_bit_identically(tmp_path):
  steps = 500
  settings = {**TINY, "train.steps": steps, "train.log_every": 10, "train.checkpoint_every": 50,
              "regularizers": [dict(name="pruning", sparsity=0.8, start_step=50, end_step=400,
                                    frequency=25)]}
  experiment = write_experiment(tmp_path / "pruned.py", experiment_text(settings))
  config = deepflow.load_config(experiment)
  loop.train_and_evaluate(config, str(tmp_path / "reference"))
  workdir = str(tmp_path / "run")
  # The killed run on the in-process tests' devices, so all three runs share one program.
  process = deepflow_process("train", "--config", experiment, "--workdir", workdir,
                             env={"XLA_FLAGS": os.environ["XLA_FLAGS"]})
  wait_for_step(process, workdir, 150)
  process.send_signal(signal.SIGKILL)
  process.communicate()
  assert 150 <= logged_step(workdir) < steps
  exp, checkpointer = Experiment(config, None), Checkpointer(workdir, read_only=True)
  try:
    for step in checkpointer.manager.all_steps():  # every checkpoint the killed run left
      assert_masks_follow_schedule(exp.restore(checkpointer, step)[0], 0.8, 50, 400, 25)
  finally:
    checkpointer.close()
  loop.train_and_evaluate(config, workdir)
  want = Experiment.from_workdir(str(tmp_path / "reference"), checkpoint="latest").state
  got = Experiment.from_workdir(workdir, checkpoint="latest").state
  assert int(got.step) == steps
  assert_bit_identical((want.params, want.opt_state), (got.params, got.opt_state))
  assert_masks_follow_schedule(got, 0.8, 50, 400, 25)
  assert_export_compresses_the_zeros(workdir, str(tmp_path / "artifact"))


def assert_export_compresses_the_zeros(workdir, out):
  """The artifact's weights.npz deflates a pruned run's zeros and stores the kernels exactly;
  ``deepflow.predict`` reads it as it is."""
  export.export(workdir, out, platforms=("cpu",))
  with zipfile.ZipFile(os.path.join(out, "weights.npz")) as archive:
    infos = archive.infolist()
  assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in infos)
  assert sum(i.compress_size for i in infos) < 0.6 * sum(i.file_size for i in infos)
  stored = dict(np.load(os.path.join(out, "weights.npz")))
  exp, state, _, _ = Experiment.from_workdir(workdir)
  kernel = flatten(jax.device_get(state.params))["Dense_0/kernel"]
  [name] = [k for k in stored if k.endswith("Dense_0/kernel")]
  np.testing.assert_array_equal(stored[name], kernel)
  outputs = predict.load(out)(export.raw_example(exp))
  assert outputs.shape == (1, 10) and np.all(np.isfinite(outputs))


@pytest.mark.parametrize("options, message", [
    (dict(sparsity=1.0, end_step=5), r"sparsity must be in \[0, 1\)"),
    (dict(sparsity=-0.1, end_step=5), r"sparsity must be in \[0, 1\)"),
    (dict(sparsity=0.5, start_step=5, end_step=5), "ends .* before it starts"),
    (dict(sparsity=0.5, end_step=5, params="conv"), "'conv' matches no parameter"),
])
def test_bad_options_are_one_line_errors(options, message):
  with pytest.raises(ConfigError, match=message) as e:
    Experiment(tiny_config(regularizers=[dict(name="pruning", **options)]), None)
  assert "\n" not in str(e.value)
