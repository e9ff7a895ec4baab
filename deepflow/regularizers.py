"""Loss-side regularizers, named in ``config.regularizers`` (a list of dicts with a 'name')."""
from deepflow.registry import REGULARIZERS  # noqa: F401
