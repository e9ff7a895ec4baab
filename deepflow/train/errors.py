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


class Stopped(Exception):
  """Raised after the loop saved a checkpoint because its ``on_eval`` hook asked it to stop at
  an evaluation (a sweep's pruner); ``metrics`` are that evaluation's."""

  def __init__(self, step: int, metrics: dict[str, float]):
    super().__init__(f"stopped at step {step} by the evaluation hook; checkpoint saved")
    self.step, self.metrics = step, metrics


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir (``deepflow.train.workdir_lock``)."""
