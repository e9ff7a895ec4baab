"""Offline real datasets as TFDS builders over data that well-kept packages already ship.

``bundled:NAME`` in a config resolves through ``BUILDERS``; the builder is prepared into the TFDS
data dir on first use (no network) and then read with ``tfds.data_source`` like any dataset.
Builders with configs (co2, sunspots, text, fair) take one by name or derived with
``base.derive_config`` (e.g. ``bundled:co2/weekly/window=104``)."""
from deepflow.data.bundled.co2 import DeepflowCo2
from deepflow.data.bundled.digits import DeepflowDigits
from deepflow.data.bundled.fair import DeepflowFair
from deepflow.data.bundled.sunspots import DeepflowSunspots
from deepflow.data.bundled.tabular import (DeepflowBreastCancer, DeepflowBreastCancerMissing,
                                           DeepflowBreastCancerRare, DeepflowWine)
from deepflow.data.bundled.text import DeepflowPydocText

BUILDERS = {
    "digits": DeepflowDigits,
    "co2": DeepflowCo2,
    "sunspots": DeepflowSunspots,
    "text": DeepflowPydocText,
    "fair": DeepflowFair,
    "breast_cancer": DeepflowBreastCancer,
    "breast_cancer_missing": DeepflowBreastCancerMissing,
    "breast_cancer_rare": DeepflowBreastCancerRare,
    "wine": DeepflowWine,
}
