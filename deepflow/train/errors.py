"""How a run ends early, as exceptions the CLI reports (kept apart from the loop so that catching
them imports nothing of the training stack)."""


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/inf loss or gradient (the bad update was never applied)."""


class Preempted(Exception):
  """Raised after the loop saved a checkpoint on SIGTERM or Ctrl-C; a rerun resumes. The CLI
  exits 0 after SIGTERM (a preemption is not a failure) and 130 after Ctrl-C, as shells do."""

  def __init__(self, step: int, *, interrupted: bool = False):
    what = "interrupted" if interrupted else "preempted"
    super().__init__(f"{what} at step {step}; checkpoint saved; rerun the same command to "
                     f"resume")
    self.step, self.interrupted = step, interrupted


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir (``deepflow.train.workdir_lock``)."""
