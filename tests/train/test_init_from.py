"""model.init_from: a run's first state from a deepflow run, an Orbax directory, safetensors or
npz, compared with the source's own arrays; renames, skips, one-line mismatches; a resumed run
never reloads the source."""
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import deepflow
from deepflow import export
from deepflow.train import init_from
from deepflow.train.experiment import Experiment
from deepflow.registry import ConfigError
from deepflow.weights import files
from deepflow.weights.matching import WeightsMismatchError
from tests.helpers import (deepflow_cli, free_port, one_line_error, subprocess_environment,
                           tiny_config, write_experiment)

def config(*overrides, hidden=(16,)):
  return tiny_config(*overrides, model=dict(name="mlp", hidden=hidden))


def experiment(*overrides, **kwargs):
  return Experiment(config(*overrides, **kwargs), None)


def variables(state):
  return files.flatten(jax.device_get({"params": state.params, **state.model_state}))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A 4-step run with checkpoints at steps 2 and 4."""
  workdir = str(tmp_path_factory.mktemp("source"))
  deepflow.train_and_evaluate(config("train.steps=4", "train.checkpoint_every=2"), workdir)
  return workdir


def source_variables(workdir, checkpoint):
  return variables(Experiment.from_workdir(workdir, checkpoint=checkpoint).state)


@pytest.mark.parametrize("spec, checkpoint", [("{run}:2", 2), ("{run}", "latest"),
                                              ("{run}:best", "latest"),
                                              ("{run}/checkpoints", "latest"),
                                              ("{run}/checkpoints/2", 2)])
def test_loads_the_sources_arrays_exactly(source, spec, checkpoint):
  exp = experiment(f"model.init_from={spec.format(run=source)}")
  state = init_from.initial_state(exp)
  expected = source_variables(source, checkpoint)
  loaded = variables(state)
  assert loaded.keys() == expected.keys()
  for name in expected:
    np.testing.assert_array_equal(loaded[name], expected[name])
  assert int(state.step) == 0  # the run's own step, and a fresh optimizer state
  jax.tree.map(np.testing.assert_array_equal, state.opt_state, exp.init_state().opt_state)


def test_safetensors_round_trip_is_bit_identical(source, tmp_path):
  path, tensors, step = export.export_safetensors(source, str(tmp_path))
  assert step == 4 and path.endswith("model.safetensors")
  expected = source_variables(source, "latest")
  read = load_file(path)  # the safetensors library's own reader
  assert read.keys() == expected.keys()
  for name in expected:
    assert read[name].dtype == expected[name].dtype
    assert read[name].tobytes() == expected[name].tobytes()
  np.savez(tmp_path / "w.npz", **read)
  for spec in (path, str(tmp_path / "w.npz")):
    loaded = variables(init_from.initial_state(experiment(f"model.init_from={spec}")))
    for name in expected:
      assert loaded[name].tobytes() == expected[name].tobytes()


def test_init_map_renames_and_init_skip_leaves_fresh(tmp_path):
  fresh = variables(experiment().init_state())
  renamed = {k.replace("Dense_0", "encoder").replace("Dense_1", "old_head"): v + 1.0
             for k, v in fresh.items()}
  renamed["params/old_head/kernel"] = np.zeros((16, 3), np.float32)  # another number of classes
  save_file(renamed, str(tmp_path / "w.safetensors"))
  state = init_from.initial_state(experiment(
      f"model.init_from={tmp_path / 'w.safetensors'}", "model.init_map=[('encoder', 'Dense_0')]",
      "model.init_skip=old_head|Dense_1"))
  loaded = variables(state)
  np.testing.assert_array_equal(loaded["params/Dense_0/kernel"], fresh["params/Dense_0/kernel"] + 1)
  np.testing.assert_array_equal(loaded["params/Dense_1/kernel"], fresh["params/Dense_1/kernel"])


def test_lora_adapters_start_fresh_on_the_loaded_kernels(tmp_path):
  """A LoRA run from plain weights: base variables are the source's, the adapters and the
  optimizer state what a fresh run of the same config initialises."""
  source = {k: v + 1.0 for k, v in variables(experiment().init_state()).items()}
  np.savez(tmp_path / "w.npz", **source)
  exp = experiment(f"model.init_from={tmp_path / 'w.npz'}", "model.lora.rank=2")
  state, fresh = init_from.initial_state(exp), exp.init_state()
  loaded, initialised = variables(state), variables(fresh)
  assert set(loaded) - set(source) == {"params/Dense_0/lora_a", "params/Dense_0/lora_b",
                                       "params/Dense_1/lora_a", "params/Dense_1/lora_b"}
  for name, value in loaded.items():
    np.testing.assert_array_equal(value, source.get(name, initialised[name]), err_msg=name)
  jax.tree.map(np.testing.assert_array_equal, state.opt_state, fresh.opt_state)


@pytest.mark.parametrize("edit, message", [
    (lambda t: {**t, "params/extra/kernel": np.ones(2, np.float32)},
     "unexpected 1: params/extra/kernel"),
    (lambda t: {k: v for k, v in t.items() if k != "params/Dense_1/bias"},
     "missing 1: params/Dense_1/bias"),
    (lambda t: {**t, "params/Dense_0/bias": np.ones(3, np.float32)},
     "wrong shape (source vs model) 1: params/Dense_0/bias (3,) vs (16,)"),
])
def test_tensors_that_do_not_fit_are_one_error(tmp_path, edit, message):
  save_file(edit(variables(experiment().init_state())), str(tmp_path / "w.safetensors"))
  with pytest.raises(WeightsMismatchError, match="does not fit the model") as error:
    init_from.initial_state(experiment(f"model.init_from={tmp_path / 'w.safetensors'}"))
  assert message in str(error.value) and "\n" not in str(error.value)


def test_checkpoint_of_another_architecture(source):
  with pytest.raises(WeightsMismatchError, match=r"wrong shape .* 3: params/Dense_0/bias"):
    init_from.initial_state(experiment(f"model.init_from={source}", hidden=(8,)))


def test_resume_continues_from_its_own_checkpoint(source, tmp_path):
  weights = str(tmp_path / "w.safetensors")
  export.export_safetensors(source, weights)
  workdir = str(tmp_path / "run")
  deepflow.train_and_evaluate(config("train.steps=2", f"model.init_from={weights}"), workdir)
  os.remove(weights)  # a resume that read the source again would fail
  deepflow.train_and_evaluate(config("train.steps=4", f"model.init_from={weights}"), workdir)
  assert Experiment.from_workdir(workdir, checkpoint="latest").step == 4


def test_missing_source_through_the_cli(tmp_path):
  workdir = tmp_path / "run"
  out = deepflow_cli("train", "--config", write_experiment(tmp_path / "exp.py"), "--workdir",
                     str(workdir), f"--config.model.init_from={tmp_path / 'nowhere'}")
  assert "no such run, checkpoint directory or weights file" in one_line_error(out)
  assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")


def test_a_directory_that_is_not_a_checkpoint(tmp_path):
  with pytest.raises(ConfigError, match="cannot read an Orbax checkpoint in .*: no Orbax "
                                        r"metadata \(not a checkpoint\)$"):
    init_from.read_source(str(tmp_path))


def test_every_sweep_trial_starts_from_the_same_weights(source, tmp_path):
  """One plain-SGD step per trial: from one start, trial i's update is -lr_i * (the same
  gradient), so (params_i - start) / lr_i agrees across learning rates."""
  from deepflow import sweep
  start = source_variables(source, "latest")
  rates = (0.5, 0.05)
  sweep.run_sweep(config("optimizer.name=sgd", "optimizer.momentum=0.0", "train.steps=1",
                         f"model.init_from={source}"),
                  str(tmp_path), [sweep.parse_axis(f"optimizer.learning_rate={rates[0]},"
                                                   f"{rates[1]}")])
  directions = []
  for i, rate in enumerate(rates):
    trial = source_variables(str(tmp_path / f"trial_{i:03d}"), "latest")
    directions.append({k: (trial[k] - start[k]) / rate for k in start})
  for name in start:
    assert np.any(directions[0][name])
    np.testing.assert_allclose(directions[0][name], directions[1][name], rtol=1e-4, atol=1e-6)


def test_a_vectorized_sweep_refuses_init_from():
  from deepflow.sweep.population import Population
  configs = [config("model.init_from=runs/x", f"optimizer.learning_rate={lr}") for lr in (.1, .2)]
  with pytest.raises(ConfigError, match="--vectorize does not support model.init_from; sweep"):
    Population(configs)


def test_export_safetensors_through_the_cli(source, tmp_path):
  out = deepflow_cli("export", "--workdir", source, "--checkpoint", "2", "--format",
                     "safetensors", "--out", str(tmp_path / "w.safetensors"))
  assert out.returncode == 0, out.stderr
  assert "exported the weights of step 2" in out.stdout
  read, expected = load_file(str(tmp_path / "w.safetensors")), source_variables(source, 2)
  assert read.keys() == expected.keys()
  assert all(read[k].tobytes() == expected[k].tobytes() for k in expected)


# One process of a 2-process run (2 CPU devices each): the model's variables split over the 4
# devices (fsdp), so every array spans both processes and none is fully addressable.
LOAD_ON_EACH_PROCESS = """
import sys
import jax
import numpy as np
port, process_id, experiment, run, expected = sys.argv[1:]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
import deepflow
from deepflow import parallel
from deepflow.train import init_from
from deepflow.train.experiment import Experiment
from deepflow.weights import files
truth = files.read(expected)
for source in (run, expected, run + "/checkpoints"):
  config = deepflow.load_config(experiment, [
      f"model.init_from={source}", "model.init_skip=Dense_1/bias", "parallel.strategy=fsdp",
      "parallel.fsdp_min_size=1"])
  exp = Experiment(config, None)
  state = init_from.initial_state(exp)
  assert not state.params["Dense_0"]["kernel"].is_fully_addressable
  assert state.params["Dense_0"]["kernel"].sharding == exp.shardings.params["Dense_0"]["kernel"]
  loaded = files.flatten(parallel.to_host({"params": state.params}))
  fresh = files.flatten(parallel.to_host({"params": exp.init_state().params}))
  for name in truth:
    want = fresh[name] if name == "params/Dense_1/bias" else truth[name]
    np.testing.assert_array_equal(loaded[name], want, err_msg=name)
  assert int(parallel.to_host(state.step)) == 0
print("loaded equal on process", process_id)
"""


def test_two_processes_load_the_source_into_arrays_they_share(source, tmp_path):
  """A run of 2 processes starts from a deepflow run, an .npz and an Orbax directory saved on 8
  devices: on each process, the gathered parameters equal the source's (the skipped one equals
  a fresh initialisation)."""
  expected = source_variables(source, "latest")
  np.savez(tmp_path / "expected.npz", **expected)
  script = tmp_path / "load.py"
  script.write_text(LOAD_ON_EACH_PROCESS)
  experiment_file = write_experiment(tmp_path / "exp.py")  # the source's model and data
  env = subprocess_environment({"JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION":
                                "gloo"}, devices=2)
  port = free_port()
  args = [experiment_file, source, str(tmp_path / "expected.npz")]
  processes = [subprocess.Popen([sys.executable, str(script), str(port), str(i), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for i in range(2)]
  try:
    outs = [p.communicate(timeout=150) for p in processes]
  except subprocess.TimeoutExpired:
    for p in processes:
      p.send_signal(signal.SIGABRT)  # its threads' stacks (PYTHONFAULTHANDLER), then it ends
    stacks = [p.communicate()[1][-3000:] for p in processes]
    raise AssertionError("a process ran over 150 s; threads:\n" + "\n".join(stacks)) from None
  for i, (p, (out, err)) in enumerate(zip(processes, outs)):
    assert p.returncode == 0, err[-4000:]
    assert f"loaded equal on process {i}" in out
