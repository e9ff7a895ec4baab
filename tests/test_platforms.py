"""No libtpu output where there is no TPU (``deepflow.platforms``), with libtpu installed."""
import importlib.util
import os
import subprocess
import sys

import pytest

from deepflow import platforms
from tests.helpers import subprocess_environment, write_experiment

# What libtpu prints when it starts on a machine that is not a TPU VM.
LIBTPU_LINES = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "Source Location Trace",
                "libtpu")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None or platforms.tpu_attached(),
    reason="needs libtpu installed on a machine without a TPU")


def unset_platforms() -> dict:
  """The subprocess environment without conftest's JAX_PLATFORMS=cpu: JAX's own default. libtpu
  loaded by another process (a parallel test's plan --topology) holds /tmp/libtpu_lockfile, and a
  second load then fails without a word; ALLOW_MULTIPLE_LIBTPU_LOAD lets it start (and print)
  whatever else runs, so the control always sees the lines and the check always could."""
  env = {k: v for k, v in subprocess_environment().items()
         # plan's topology compiles set TPU_* in this process (libtpu is quiet with them)
         if k != "JAX_PLATFORMS" and not k.startswith("TPU_")}
  env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
  return env


def libtpu_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if any(m in line for m in LIBTPU_LINES)]


def test_jax_alone_starts_libtpu_here():
  """The control: JAX choosing its platforms itself loads libtpu, which prints its warnings."""
  out = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices()[0].platform)"],
                       capture_output=True, text=True, env=unset_platforms(), timeout=120)
  assert out.returncode == 0 and out.stdout.strip() == "cpu", out.stderr
  assert libtpu_lines(out.stderr), out.stderr


def test_a_cpu_run_prints_nothing_from_libtpu(tmp_path):
  experiment = write_experiment(tmp_path / "tiny.py")
  out = subprocess.run(
      [sys.executable, "-m", "deepflow", "train", "--config", experiment, "--workdir",
       str(tmp_path / "run"), "--config.train.steps=2", "--config.train.eval_every=0"],
      capture_output=True, text=True, env=unset_platforms(), timeout=240)
  assert out.returncode == 0, out.stderr
  assert "final test metrics" in out.stdout
  assert libtpu_lines(out.stderr) == [], out.stderr


def test_a_platform_the_user_names_is_kept(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "")
  platforms.skip_absent_tpu()
  assert os.environ["JAX_PLATFORMS"] == ""
