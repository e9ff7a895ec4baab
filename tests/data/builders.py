"""TFDS builders of one's own, registered on import (``deepflow data prepare --imports
tests.data.builders``): one that prepares offline, and ones that fail the ways a real
preparation does (TensorFlow missing, no network, files to download by hand)."""
import requests

from deepflow.data import generated

SPLITS = {"train": 96, "test": 32}


class DeepflowTestImages(generated.builder_class("unused", splits=SPLITS, image_size=(8, 8))):
  """96 + 32 generated 8x8 JPEGs: prepares offline, as ``deepflow_test_images``."""


class DeepflowTestNeedsTensorflow(DeepflowTestImages):
  def _split_generators(self, dl_manager):
    import tensorflow  # noqa: F401  (as a builder that parses its archives with TensorFlow)


class DeepflowTestNeedsNetwork(DeepflowTestImages):
  def _split_generators(self, dl_manager):
    requests.get("http://127.0.0.1:1/archive.tar", timeout=5)  # nothing listens: refused


class DeepflowTestNeedsManualFiles(DeepflowTestImages):
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put archive.tar in the manual directory."

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(0, len(list(dl_manager.manual_dir.iterdir())))}
