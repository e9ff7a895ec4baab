"""Datasets and preprocessing. Importing this package registers every dataset and transform in
``deepflow.registry.DATASETS`` and ``TRANSFORMS``; ``pipeline`` (the Grain loader) is imported by
those who load batches."""
from deepflow.data import augment, images, sources, tokenize, transforms  # noqa: F401  (registration)
