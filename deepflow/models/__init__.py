"""Model families. Importing this package registers every model in ``deepflow.registry.MODELS``.

Contract for every model: a Flax Linen module whose first field is ``num_outputs`` (filled in
from the dataset by the builder) and whose ``__call__(x, *, train=False)`` is pure; stochastic
layers draw from the ``'dropout'`` RNG stream; mutable state (batch norm) lives in the
``'batch_stats'`` collection.
"""
from deepflow.models import cnn, contrastive, gan, layers, mlp, resnet, rnn, sampling, transformer, vit  # noqa: F401,E501  (registration)
