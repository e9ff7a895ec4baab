"""Objectives. Importing this package registers every task in ``deepflow.registry.TASKS``."""
from deepflow.tasks import supervised  # noqa: F401  (registration)
from deepflow.tasks.base import Task  # noqa: F401
