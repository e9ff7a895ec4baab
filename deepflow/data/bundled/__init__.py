"""Offline real datasets as TFDS builders over data that well-kept packages already ship.

``bundled:NAME`` in a config resolves through ``BUILDERS``, which ``register_builder`` fills in
the modules imported here; the builder is prepared into the TFDS data dir on first use (no
network) and then read with ``tfds.data_source`` like any dataset. Builders with configs (co2,
sunspots, text, fair) take one by name or derived with ``base.derive_config`` (e.g.
``bundled:co2/weekly/window=104``)."""
from deepflow.data.bundled import co2, digits, fair, sunspots, tabular, text  # noqa: F401,E501  (registration)
from deepflow.data.bundled.base import BUILDERS  # noqa: F401
