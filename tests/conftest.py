"""Test setup: 8 fake CPU devices (set before JAX initialises) and an offline TFDS data dir."""
import os

# 8 simulated devices. Their collectives rendezvous on host threads. The deadlocks once seen
# here were not starvation but unbounded run-ahead (see deepflow.parallel.DispatchWindow and
# docs/design.md); XLA's own deadline is kept short so a collective that still never completes
# aborts with XLA's message naming it, well inside the per-test limit (pyproject.toml: timeout).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=120"
                           " --xla_cpu_collective_timeout_seconds=120").strip()
# Subprocesses (the CLI in tests) dump every thread's Python stack on SIGABRT: tests/helpers.py
# sends one to a child that overruns its time limit.
os.environ["PYTHONFAULTHANDLER"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite compiles hundreds of small programs; XLA's optimization passes dominate its time on
# 2 cores. Every comparison in the tests is between programs compiled the same way (and
# subprocesses inherit this), so skipping them changes no verdict and halves the CPU time.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One TFDS data dir per test session: bundled datasets are prepared into it once."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def image_data_dir(tmp_path_factory):
  """Real encoded image datasets written once per session as TFDS ArrayRecord: 'gen_jpeg'
  (16x16 JPEG, 320 train / 64 test) and 'gen_png' (PNG of 16 to 24 pixels a side, variable)."""
  from deepflow.data import generated
  root = str(tmp_path_factory.mktemp("images"))
  generated.prepare("gen_jpeg", root, splits={"train": 320, "test": 64}, image_size=(16, 16))
  generated.prepare("gen_png", root, splits={"train": 96, "test": 32}, image_size=(16, 16),
                    size_jitter=8, image_format="png", seed=1)
  return root
