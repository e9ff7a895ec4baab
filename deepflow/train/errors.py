"""How a run ends early, as exceptions the CLI reports (kept apart from the loop so that catching
them imports nothing of the training stack)."""


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/inf loss or gradient (the bad update was never applied)."""


class Preempted(Exception):
  """Raised after the loop saved a checkpoint on SIGTERM; the CLI exits 0 and a rerun resumes."""

  def __init__(self, step: int):
    super().__init__(f"preempted at step {step}; checkpoint saved, rerun to resume")
    self.step = step
