"""scikit-learn's handwritten digits (UCI ML hand-written digits, 1,797 8x8 images) as a TFDS
builder. The data ships inside scikit-learn, so preparing it needs no network."""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from deepflow.data.bundled.base import BundledBuilder, register_builder


@register_builder("digits")
class DeepflowDigits(BundledBuilder):
  """Digits 0-9; pixel values 0..16 as float32 images of shape (8, 8, 1).

  Split: a fixed stratified 80/20 train/test split (seed 0), the same on every machine."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.float32),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
    )

  def _split_generators(self, dl_manager):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    images = digits.images.astype(np.float32)[..., None]
    idx = np.arange(len(images))
    train, test = train_test_split(idx, test_size=0.2, random_state=0, stratify=digits.target)
    return {name: self._generate_examples(images[ix], digits.target[ix]) for name, ix in
            (("train", train), ("test", test))}

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}
