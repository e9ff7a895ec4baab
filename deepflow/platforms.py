"""Which JAX platforms a command starts, so that libtpu stays unloaded where there is no TPU.

With ``JAX_PLATFORMS`` unset JAX initialises every backend it has a plugin for, the TPU one
included whenever libtpu is installed (the ``deepflow[tpu]`` extra, which ``plan --topology``
needs): libtpu then loads, looks for a TPU VM's worker and accelerator settings and prints
five lines of warnings about them before failing over to the next backend. Where no TPU chip
is attached (none on the PCI bus under Google's vendor id, no ``/dev/accel*``), deepflow names
the platforms itself: ``cpu``, after ``cuda`` where an NVIDIA GPU and JAX's CUDA plugin are
both present. A ``JAX_PLATFORMS`` the user set (even empty) is left as it is, as is any machine
whose GPU deepflow cannot name. ``plan --topology`` loads libtpu on its own, for compiling
only, whatever the platforms.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips appear on the PCI bus under Google's vendor id
CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin")


def tpu_attached() -> bool:
  """Whether this machine has a TPU chip: a Google PCI device, or an ``/dev/accel*`` node."""
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return True
  for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(path) as f:
        if f.read().strip() == GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def local_platforms() -> str | None:
  """The platforms to start where no TPU is attached ('cpu', or 'cuda,cpu'), or None to leave
  the choice to JAX (a TPU is attached, libtpu is not installed, or a GPU JAX may not drive)."""
  if importlib.util.find_spec("libtpu") is None or tpu_attached():
    return None
  if glob.glob("/dev/nvidia[0-9]*"):
    if not any(importlib.util.find_spec(p) for p in CUDA_PLUGINS):
      return None
    return "cuda,cpu"
  if os.path.exists("/dev/kfd"):  # an AMD GPU: JAX's ROCm plugin decides
    return None
  return "cpu"


def skip_absent_tpu() -> None:
  """Names the platforms (``local_platforms``) unless ``JAX_PLATFORMS`` is set; called before
  JAX starts a backend. Subprocesses inherit the choice through the environment."""
  if "JAX_PLATFORMS" in os.environ:
    return
  platforms = local_platforms()
  if platforms is None:
    return
  os.environ["JAX_PLATFORMS"] = platforms
  if "jax" in sys.modules:  # imported already: its config read the variable at import
    sys.modules["jax"].config.update("jax_platforms", platforms)
