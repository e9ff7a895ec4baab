"""Weights in and out: named tensors for starting a run from trained weights
(``model.init_from``) and for ``deepflow export --format safetensors``.

A model's weights are a flat mapping of names to arrays: ``params/<module path>/<leaf>`` and, for
models with batch norm, ``batch_stats/<module path>/{mean,var}`` (the '/'-joined Flax paths, the
same names in every format). ``files`` reads and writes them (safetensors, npz); ``matching``
fits a source's tensors to a configured model (``model.init_map`` renames, ``model.init_skip``
leaves parts fresh, anything else that does not fit is a one-line error); ``pytorch`` renames and
transposes a PyTorch ``state_dict`` into those names (``model.init_layout='pytorch'``).
Reading a deepflow run or an Orbax checkpoint directory is ``deepflow.train.init_from``.
"""
from deepflow.weights import files, matching, pytorch  # noqa: F401
