"""Training: state, pure steps, the loop, checkpoints and metric writers."""
from deepflow.train.experiment import Experiment  # noqa: F401
from deepflow.train.loop import NonFiniteLossError, Preempted, train_and_evaluate  # noqa: F401
from deepflow.train.state import TrainState  # noqa: F401
