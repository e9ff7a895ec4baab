"""``python -m deepflow`` is the ``deepflow`` command."""
from deepflow.cli import run

run()
