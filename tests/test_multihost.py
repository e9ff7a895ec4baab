"""Multi-host for real: 2 processes x 2 CPU devices (gloo collectives) against 1 process x 4
devices, same experiment: the same final parameters and metrics, one metrics writer."""
import json
import os
import subprocess
import sys

import jax
import numpy as np

import deepflow
from deepflow.train.checkpoint import Checkpointer
from deepflow.train.experiment import Experiment
from tests.helpers import TINY, experiment_text, free_port, write_experiment

EXPERIMENT = experiment_text({
    **TINY, "model": dict(name="mlp", hidden=(16,), dropout=0.1), "train.steps": 20,
    "train.log_every": 5, "train.eval_every": 10, "train.checkpoint_every": 10})


def launch(experiment, workdir, devices, process_id=None, num_processes=None, port=None):
  flags = os.environ["XLA_FLAGS"].replace("device_count=8", f"device_count={devices}")
  env = {**os.environ, "XLA_FLAGS": flags,
         "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
  args = [sys.executable, "-m", "deepflow", "train", "--config", experiment, "--workdir", workdir]
  if num_processes:
    args += ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes",
             str(num_processes), "--process_id", str(process_id)]
  return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env)


def test_two_processes_equal_one_process_with_the_same_devices(tmp_path):
  experiment = write_experiment(tmp_path / "exp.py", EXPERIMENT)
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  port = free_port()
  procs = [launch(experiment, multi, 2, i, 2, port) for i in range(2)]
  procs.append(launch(experiment, single, 4))
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  final = [line for line in outs[0][0].splitlines() if line.startswith("final")]
  assert final and final == [line for line in outs[2][0].splitlines()
                             if line.startswith("final")]
  assert not [line for line in outs[1][0].splitlines() if line.startswith("final")]

  config = deepflow.load_config(experiment)
  params = []
  for workdir in (multi, single):
    checkpointer = Checkpointer(workdir, read_only=True)
    state, data_state, step = Experiment(config, workdir).restore(checkpointer)
    checkpointer.close()
    assert step == 20
    params.append(jax.device_get(state.params))
  for a, b in zip(*map(jax.tree.leaves, params)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  records = [json.loads(x) for x in open(os.path.join(multi, "metrics.jsonl"))]
  assert [r["step"] for r in records if r["split"] == "train"] == [5, 10, 15, 20]  # one writer
