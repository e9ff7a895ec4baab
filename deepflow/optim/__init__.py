"""Optimizers and schedules from config (optax); differential privacy is ``deepflow.privacy``."""
from deepflow.optim.optimizers import build_optimizer  # noqa: F401
from deepflow.optim.schedules import build_schedule  # noqa: F401
