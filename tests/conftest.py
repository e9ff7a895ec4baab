"""Test setup: 8 fake CPU devices (set before JAX initialises) and an offline TFDS data dir."""
import os

# 8 simulated devices. Their collectives rendezvous on host threads; on 2 busy cores (pytest -n 2)
# a thread can be starved past XLA's default deadline, which aborts the process, so the
# deadline is raised: a stuck collective still fails, after 5 minutes.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=300"
                           " --xla_cpu_collective_timeout_seconds=300").strip()
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
