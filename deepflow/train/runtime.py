"""Process-wide services a run switches on from its config: JAX's persistent compilation cache
and ``jax.profiler`` traces of a range of steps."""
from __future__ import annotations

import logging
import os

import jax
from etils import epath
from jax.experimental.compilation_cache import compilation_cache

log = logging.getLogger("deepflow")
PROFILE_DIR = "profile"


def use_compilation_cache(directory: str) -> None:
  """Compiled programs are kept in ``directory`` ('' = no cache), so a rerun, a resumed run or
  another run of the same shapes loads them instead of compiling again. Every program is kept,
  however fast it compiled: a small model's many small programs add up to its time to first
  step."""
  if not directory:
    jax.config.update("jax_enable_compilation_cache", False)
    return
  path = os.path.expanduser(directory)
  if jax.config.jax_compilation_cache_dir != path:
    jax.config.update("jax_compilation_cache_dir", path)
    compilation_cache.reset_cache()  # picks up the new directory at the next compile
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


class StepProfiler:
  """Traces steps ``[first, last)`` of ``train.profile_steps`` into ``workdir/profile`` (view
  with TensorBoard's profile plugin or xprof); an empty range traces nothing."""

  def __init__(self, steps, workdir: str):
    self.steps = tuple(steps)  # validated with the config
    self.directory = str(epath.Path(workdir) / PROFILE_DIR)
    self.active = False

  def before(self, step: int) -> None:
    """Called before the update that takes the state from ``step`` to ``step + 1``."""
    if self.steps and step == self.steps[0]:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, outputs) -> None:
    """Called once ``step`` updates are done; waits for them before ending the trace."""
    if self.active and step >= self.steps[1]:
      jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      self.active = False
      log.info("profile of steps %d-%d written to %s", self.steps[0], self.steps[1] - 1,
               self.directory)

  def close(self) -> None:
    if self.active:  # the run ended inside the range
      jax.profiler.stop_trace()
      self.active = False
