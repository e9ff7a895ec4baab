"""A run that will not fit says so before it starts (``deepflow.train.fit``), from real
compiles of its steps compared with real memory figures."""
import os
import re
import subprocess
import sys

import jax
import pytest

from deepflow import plan as plan_lib
from deepflow.train import fit
from deepflow.train.experiment import Experiment
from tests.helpers import (deepflow_cli, experiment_text, one_line_error, subprocess_environment,
                           write_experiment)

# Two hidden layers of 2^18 units: 2^36 parameters in the middle kernel alone, 256 GiB in
# float32, three times that with AdamW's two moments: more than any machine the suite runs on.
HUGE = 2 ** 18
TOO_LARGE = experiment_text({
    "model": dict(name="mlp", hidden=(HUGE, HUGE)), "data.source": "synthetic:digits_like",
    "data.batch_size": 8, "data.eval_batch_size": 8, "train.steps": 3})


def one_device_experiment(batch_size: int) -> Experiment:
  from tests.helpers import tiny_config
  config = tiny_config(f"data.batch_size={batch_size}", "data.eval_batch_size=8",
                       model=dict(name="mlp", hidden=(256,)), num_devices=1)
  return Experiment(config, None, devices=jax.devices()[:1])


def train_peak(exp: Experiment, batch_size: int) -> int:
  """The reference: the train step compiled directly at ``batch_size``, its peak per device."""
  return plan_lib.compile_cost(exp.train_step, plan_lib.abstract_args(exp),
                               exp.pipeline.abstract_batch(batch_size, train=True)).peak


def test_a_run_that_does_not_fit_stops_with_one_line_before_writing(tmp_path):
  workdir = tmp_path / "run"
  out = deepflow_cli("train", "--config", write_experiment(tmp_path / "huge.py", TOO_LARGE),
                     "--workdir", str(workdir))
  line = one_line_error(out)
  need = re.search(r"mlp at global batch 8 does not fit: the train step needs ([\d.]+) GiB per "
                   r"device, each of the 2 CPU devices \(sharing the host's [\d.]+ GiB "
                   r"available\) has ([\d.]+) GiB; not even the smallest global batch fits",
                   line)
  assert need, line
  kernel_bytes = HUGE * HUGE * 4
  assert float(need.group(1)) * 2 ** 30 >= 3 * kernel_bytes  # weights and AdamW's 2 moments
  assert float(need.group(2)) < float(need.group(1))
  assert "--config.train.microbatches=2" in line and "deepflow plan" in line
  # Nothing of the run but its definition: no checkpoint, metrics or TensorBoard events.
  assert set(os.listdir(workdir)) <= {"config.json", "run.lock", "preprocessing.npz"}
  assert "config.json" in os.listdir(workdir)


def test_the_largest_batch_that_fits_is_found_by_compiling(monkeypatch):
  """The memory is set between the peaks of global batch 6 and 7 (each compiled directly): the
  error names 6 (after 8, the search compiled 1 for its linear guess, then 7 and 6), and a run
  that fits keeps the executables it compiled."""
  exp = one_device_experiment(8)
  six, seven = train_peak(exp, 6), train_peak(exp, 7)
  limit = (six + seven) / 2
  assert six < limit < seven
  cpus = len([d for d in jax.local_devices() if d.platform == "cpu"])
  monkeypatch.setattr(fit, "host_available_bytes", lambda: limit * cpus)
  with pytest.raises(fit.DoesNotFit, match=r"the largest global batch that fits is 6 "
                     r"\(--config.data.batch_size=6\)"):
    fit.compile_checked(exp)
  fitting = one_device_experiment(4)
  fit.compile_checked(fitting)
  assert isinstance(fitting.train_step, jax.stages.Compiled)
  assert fitting.train_step.memory_analysis().temp_size_in_bytes > 0


def test_an_out_of_memory_at_run_time_is_one_line():
  """A command whose program asks XLA for 1 TiB: the runtime's RESOURCE_EXHAUSTED, one line."""
  script = ("import jax, jax.numpy as jnp\n"
            "from deepflow import cli\n"
            "cli.COMMANDS['eval'] = lambda overrides: jax.block_until_ready(\n"
            "    jax.jit(lambda: jnp.zeros((2 ** 40,), jnp.uint8))())\n"
            "cli.run(['deepflow', 'eval'])\n")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env=subprocess_environment(), timeout=120)
  line = one_line_error(out)
  assert line.startswith("deepflow: error: out of memory while running (RESOURCE_EXHAUSTED: ")
  assert "1099511627776 bytes" in line
