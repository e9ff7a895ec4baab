"""Objectives. Importing this package registers every task in ``deepflow.registry.TASKS``."""
from deepflow.tasks import contrastive, distillation, forecasting, gan, language, supervised  # noqa: F401,E501  (registration)
from deepflow.tasks.base import Task  # noqa: F401
