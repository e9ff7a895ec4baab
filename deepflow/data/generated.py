"""Generated image datasets written as real TFDS datasets (ArrayRecord, JPEG or PNG encoded),
offline and without TensorFlow: what the tests and ``benchmarks/input_pipeline.py`` train on to
exercise the ``tfds:NAME`` path exactly as a prepared CIFAR-10 or ImageNet is read; and text
corpora of any size from Python's own help text.

Each image is a smooth class-dependent colour gradient plus noise, so a model can learn the
labels and JPEG compresses it like a photograph rather than like noise.
"""
from __future__ import annotations

import functools
import io
from typing import Any, Callable, Iterator

import numpy as np


@functools.lru_cache(maxsize=256)
def _gradient(label: int, num_classes: int, height: int, width: int) -> np.ndarray:
  """The noise-free (height, width, 3) float image of class ``label``, computed once per class
  and size (most of the generation time otherwise)."""
  angle = 2 * np.pi * label / num_classes
  ys, xs = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
  ramp = np.cos(angle) * xs + np.sin(angle) * ys                        # (H, W) in [-1.4, 1.4]
  colour = 0.5 + 0.5 * np.array([np.cos(angle), np.sin(angle), np.cos(2 * angle)])
  gradient = 128 + 80 * ramp[..., None] * colour
  gradient.flags.writeable = False
  return gradient


def _image(rng: np.random.Generator, label: int, num_classes: int, height: int, width: int
           ) -> np.ndarray:
  """A (height, width, 3) uint8 image: a gradient whose direction and colour depend on
  ``label``, plus noise."""
  image = _gradient(label, num_classes, height, width) + rng.normal(0, 20, (height, width, 3))
  return np.clip(image, 0, 255).astype(np.uint8)


def encode(image: np.ndarray, image_format: str) -> bytes:
  """PIL-encoded bytes of a uint8 image ('jpeg' at quality 90, or 'png')."""
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format=image_format.upper(), quality=90)
  return buffer.getvalue()


def _generated_builder(name: str, splits: dict[str, int], features: Callable[[], Any],
                       examples: Callable[[int, int], Iterator[dict]], **info):
  """A TFDS builder class named ``name`` writing ArrayRecord: split ``i`` of ``splits`` holds
  the ``splits[split]`` examples of ``examples(i, count)``; ``features()`` and ``info`` (e.g.
  supervised_keys) make its ``DatasetInfo``."""
  import tensorflow_datasets as tfds

  class Generated(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, **kwargs):
      kwargs.setdefault("file_format", "array_record")
      super().__init__(**kwargs)

    def _info(self):
      return self.dataset_info_from_configs(features=features(), **info)

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(i, count)
              for i, (split, count) in enumerate(splits.items())}

    def _generate_examples(self, split_seed: int, count: int):
      yield from enumerate(examples(split_seed, count))

  Generated.name = name
  return Generated


def builder_class(name: str, *, splits: dict[str, int], image_size: tuple[int, int] = (32, 32),
                  size_jitter: int = 0, image_format: str = "jpeg", num_classes: int = 10,
                  seed: int = 0):
  """A TFDS builder class named ``name`` whose splits hold ``splits[split]`` generated images of
  ``image_size`` (each side independently up to ``size_jitter`` pixels larger: variable-size
  images), encoded as ``image_format``; supervised keys (image, label)."""
  import tensorflow_datasets as tfds
  height, width = image_size
  shape = (None, None, 3) if size_jitter else (height, width, 3)

  def features():
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=shape, encoding_format=image_format),
        "label": tfds.features.ClassLabel(num_classes=num_classes)})

  def examples(split_seed: int, count: int):
    rng = np.random.default_rng([seed, split_seed])
    for _ in range(count):
      label = int(rng.integers(num_classes))
      h, w = np.array([height, width]) + (rng.integers(0, size_jitter + 1, 2) if size_jitter
                                          else 0)
      yield {"image": encode(_image(rng, label, num_classes, int(h), int(w)), image_format),
             "label": label}
  return _generated_builder(name, splits, features, examples, supervised_keys=("image", "label"))


def text_builder_class(name: str, *, splits: dict[str, int], seed: int = 0):
  """A TFDS builder class named ``name`` whose splits hold ``splits[split]`` documents (a Text
  feature ``text``), each 1 to 4 paragraphs of Python's help topics (``pydoc_data``: real
  English and code) drawn with ``seed``: a text corpus of any size, offline."""
  import tensorflow_datasets as tfds
  from pydoc_data.topics import topics
  paragraphs = [p for key in sorted(topics) for p in topics[key].split("\n\n") if p.strip()]

  def examples(split_seed: int, count: int):
    rng = np.random.default_rng([seed, split_seed])
    for _ in range(count):
      picks = rng.integers(len(paragraphs), size=int(rng.integers(1, 5)))
      yield {"text": "\n\n".join(paragraphs[j] for j in picks)}
  return _generated_builder(name, splits,
                            lambda: tfds.features.FeaturesDict({"text": tfds.features.Text()}),
                            examples)


def prepare(name: str, data_dir: str, make=builder_class, **options) -> str:
  """Writes the generated dataset ``name`` into ``data_dir`` (once; options of ``make``,
  ``builder_class`` or ``text_builder_class``), quietly; returns ``data_dir``, ready for
  ``data.source='tfds:NAME'``."""
  import tensorflow_datasets as tfds
  builder = make(name, **options)(data_dir=data_dir)
  if not builder.is_prepared():
    tfds.display_progress_bar(False)
    builder.download_and_prepare()
  return data_dir
