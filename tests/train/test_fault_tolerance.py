"""Real processes killed, preempted, interrupted and doubled: resumption is exact, saves are
atomic, damaged checkpoints are set aside, one run holds a workdir, and a loop that never reads a
result does not deadlock XLA:CPU."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

import deepflow
from deepflow.train import loop, workdir_lock
from deepflow.train.checkpoint import Checkpointer
from deepflow.train.experiment import Experiment
from tests.helpers import deepflow_cli, deepflow_process, tiny_config, write_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 1500
LONG = ["--config.train.steps=%d" % STEPS, "--config.train.log_every=25",
        "--config.train.eval_every=0", "--config.model.dropout=0.2"]


def params_of(workdir, config):
  checkpointer = Checkpointer(workdir, read_only=True)
  try:
    state, data_state, step = Experiment(config, workdir).restore(checkpointer)
  finally:
    checkpointer.close()
  return jax.device_get(state.params), data_state, step


def assert_bit_identical(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def logged_step(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  lines = [json.loads(x) for x in open(path).read().splitlines() if x.strip().endswith("}")]
  return max([r["step"] for r in lines], default=0)


def wait_for_step(process, workdir, step, timeout=120):
  deadline = time.time() + timeout
  while logged_step(workdir) < step:
    assert process.poll() is None, process.communicate()
    assert time.time() < deadline, "training did not progress"
    time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted run: the ground truth for the interrupted ones."""
  root = tmp_path_factory.mktemp("reference")
  experiment = write_experiment(root / "tiny.py")
  workdir = str(root / "run")
  out = deepflow_cli("train", "--config", experiment, "--workdir", workdir,
                     "--config.train.checkpoint_every=100", *LONG)
  assert out.returncode == 0, out.stderr
  config = deepflow.load_config(experiment, [o[len("--config."):] for o in LONG])
  return experiment, config, params_of(workdir, config)


def test_sigkill_at_an_arbitrary_step_then_resume_is_bit_identical(tmp_path, reference):
  experiment, config, (want, want_data, _) = reference
  workdir = str(tmp_path / "run")
  args = ["train", "--config", experiment, "--workdir", workdir,
          "--config.train.checkpoint_every=100", *LONG]
  process = deepflow_process(*args)
  wait_for_step(process, workdir, 350)
  process.send_signal(signal.SIGKILL)
  process.communicate()
  killed_at = logged_step(workdir)
  assert 350 <= killed_at < STEPS
  out = deepflow_cli(*args)
  assert out.returncode == 0, out.stderr
  assert "resuming from the checkpoint" in out.stderr
  got, got_data, step = params_of(workdir, config)
  assert step == STEPS and got_data == want_data  # same iterator position: same batches
  assert_bit_identical(want, got)


CRASH_DURING_SAVE = textwrap.dedent("""
    import sys, time
    import jax, numpy as np
    from deepflow.train.checkpoint import Checkpointer
    workdir = sys.argv[1]
    rng = np.random.default_rng(0)
    small = {"w": rng.normal(size=(256, 256)).astype(np.float32)}
    checkpointer = Checkpointer(workdir)
    checkpointer.save(1, small, {"next_index": 1})
    checkpointer.wait()
    big = {f"w{i}": rng.normal(size=(2048, 2048)).astype(np.float32) for i in range(24)}
    checkpointer.save(2, big, {"next_index": 2})
    print("saving", flush=True)
    time.sleep(60)
""")


def test_crash_during_a_save_leaves_the_previous_checkpoint_restorable(tmp_path):
  workdir = str(tmp_path)
  process = subprocess.Popen([sys.executable, "-c", CRASH_DURING_SAVE, workdir],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert process.stdout.readline().strip() == "saving", process.communicate()
  time.sleep(0.3)  # the 400 MB write is under way
  process.send_signal(signal.SIGKILL)
  process.communicate()
  leftovers = os.listdir(os.path.join(workdir, "checkpoints"))
  assert any(name.startswith("2.") for name in leftovers), leftovers  # killed mid-write
  checkpointer = Checkpointer(workdir, read_only=True)
  assert checkpointer.latest_step() == 1
  want = np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)
  abstract = {"w": jax.ShapeDtypeStruct((256, 256), np.float32)}
  state, data_state, step = checkpointer.restore(abstract)
  checkpointer.close()
  assert step == 1 and data_state == {"next_index": 1}
  np.testing.assert_array_equal(np.asarray(state["w"]), want)


def test_corrupted_checkpoint_is_set_aside_for_the_previous_one(tmp_path, caplog):
  config = tiny_config("train.checkpoint_every=4")
  workdir = str(tmp_path / "run")
  deepflow.train_and_evaluate(config, workdir)
  want, _, _ = params_of(workdir, config)
  state_dir = os.path.join(workdir, "checkpoints", "8", "state")
  damaged = 0
  for root, _, files in os.walk(state_dir):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 64:
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
        damaged += 1
  assert damaged
  with caplog.at_level("WARNING", logger="deepflow"):
    deepflow.train_and_evaluate(config, workdir)
  assert "checkpoint 8 is unreadable" in caplog.text
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "corrupt-8"))
  got, _, step = params_of(workdir, config)
  assert step == 8
  assert_bit_identical(want, got)  # retrained 4 -> 8 exactly as before
  shutil.rmtree(workdir)


@pytest.mark.parametrize("signum, code, said", [
    (signal.SIGTERM, 0, "preempted at step"),     # a preemption is not a failure
    (signal.SIGINT, 130, "interrupted at step"),  # Ctrl-C, as shells report it
])
def test_a_signal_saves_the_current_step_and_the_rerun_is_bit_identical(tmp_path, reference,
                                                                         signum, code, said):
  experiment, config, (want, _, _) = reference
  workdir = str(tmp_path / "run")
  args = ["train", "--config", experiment, "--workdir", workdir,
          "--config.train.checkpoint_every=0", *LONG]
  process = deepflow_process(*args)
  wait_for_step(process, workdir, 300)
  process.send_signal(signum)
  _, stderr = process.communicate(timeout=60)
  assert process.returncode == code, stderr
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
  assert said in stderr and "rerun the same command to resume" in stderr
  checkpointer = Checkpointer(workdir, read_only=True)
  steps = checkpointer.manager.all_steps()
  checkpointer.close()
  assert len(steps) == 1 and 300 <= steps[0] < STEPS  # saved where it was, not at a multiple
  out = deepflow_cli(*args)
  assert out.returncode == 0, out.stderr
  got, _, step = params_of(workdir, config)
  assert step == STEPS
  assert_bit_identical(want, got)


def test_a_second_ctrl_c_gets_the_default_action_back():
  before = signal.getsignal(signal.SIGINT)
  with loop._Preemption() as preemption:
    assert signal.getsignal(signal.SIGINT) == preemption._handle
    os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler before the next bytecode
    assert preemption.reached(1) and preemption.signal == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL  # the next one ends the process
  assert signal.getsignal(signal.SIGINT) == before  # restored


def test_one_run_per_workdir_and_a_killed_run_does_not_block_the_next(tmp_path, reference):
  experiment = reference[0]
  workdir = str(tmp_path / "run")
  args = ["train", "--config", experiment, "--workdir", workdir, *LONG]
  first = deepflow_process(*args)
  wait_for_step(first, workdir, 50)
  config_json = open(os.path.join(workdir, "config.json")).read()
  second = deepflow_cli(*args, "--config.train.steps=7")
  assert second.returncode != 0
  errors = [line for line in second.stderr.splitlines() if line.startswith("deepflow: error:")]
  assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr
  assert f"is in use by another run (pid {first.pid} on " in errors[0]
  assert open(os.path.join(workdir, "config.json")).read() == config_json  # nothing touched
  assert first.poll() is None  # the first run goes on
  first.send_signal(signal.SIGKILL)
  first.communicate()
  killed_at = logged_step(workdir)
  third = deepflow_cli(*args, "--config.train.steps=%d" % (killed_at + 10))
  assert third.returncode == 0, third.stderr  # the kernel dropped the dead run's lock
  record = json.load(open(os.path.join(workdir, workdir_lock.LOCK_FILE)))
  assert record["pid"] != first.pid and {"host", "since"} <= set(record)


def test_a_sweep_and_a_run_inside_it_hold_their_own_locks(tmp_path):
  with workdir_lock.hold(str(tmp_path)):
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()} on "):
      with workdir_lock.hold(str(tmp_path)):  # a second open file description: refused
        pass
    (tmp_path / "trial_000").mkdir()
    with workdir_lock.hold(str(tmp_path / "trial_000")):
      pass
  with workdir_lock.hold(str(tmp_path)):  # released on exit
    pass


RUN_AHEAD = textwrap.dedent("""
    import sys
    import jax
    from deepflow import parallel
    from deepflow.train import Experiment
    from tests.helpers import tiny_config
    exp = Experiment(tiny_config("train.steps=3000"), sys.argv[1])
    state = exp.init_state()
    batch = parallel.global_batch(next(exp.pipeline.train_iterator()), exp.mesh)
    in_flight = parallel.DispatchWindow()
    for _ in range(3000):  # a resident batch: the host dispatches far faster than steps finish
      state, metrics = exp.train_step(state, batch)
      in_flight.add(metrics)
    print("done", int(jax.device_get(state.step)), flush=True)
""")


def test_a_loop_that_never_reads_a_result_does_not_deadlock_xla_cpu(tmp_path):
  """3000 steps on 2 simulated devices with nothing fetched: with every step in flight at once
  this wedged in an all-reduce within the first thousand (XLA aborts it after its deadline)."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
                                    "--xla_cpu_collective_call_terminate_timeout_seconds=60"}
  out = subprocess.run([sys.executable, "-c", RUN_AHEAD, str(tmp_path)], capture_output=True,
                       text=True, timeout=200, env=env, cwd=ROOT)
  assert out.returncode == 0 and "done 3000" in out.stdout, out.stderr[-3000:]
