"""Where examples come from: ``bundled:NAME``, ``tfds:NAME`` and ``synthetic:NAME`` sources.

Every source ends up as a ``Dataset``: per split a random-access sequence of examples (dicts of
numpy arrays), plus what the model and task need to know (input/target keys, number of classes,
metadata). TFDS datasets are read with ``tfds.data_source`` (ArrayRecord): no TensorFlow.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import numpy as np

from deepflow.registry import ConfigError, DATASETS, SOURCE_KINDS


class DatasetNotFoundError(ConfigError):
  """A dataset that is not prepared locally (deepflow never downloads at run time)."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A dataset's splits (random-access sources) and the facts the model and task need."""
  name: str
  splits: Mapping[str, Sequence[Mapping[str, np.ndarray]]]
  input_key: str
  target_key: str
  num_classes: int | None = None   # classification targets; None for regression / LM
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def split(self, name: str) -> "ArraySource | Sequence":
    if name not in self.splits:
      raise ConfigError(f"dataset {self.name!r} has no split {name!r}; "
                        f"splits: {', '.join(sorted(self.splits))}")
    return self.splits[name]


class ArraySource:
  """An in-memory split: a dict of equally long arrays, indexable per example or per batch."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) != 1:
      raise ValueError(f"arrays of unequal length: { {k: len(v) for k, v in arrays.items()} }")
    self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
    self._len = lengths.pop()

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index):
    return {k: v[index] for k, v in self.arrays.items()}

  def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """A batch of examples by index (one fancy-index per feature)."""
    return {k: v[indices] for k, v in self.arrays.items()}


def stack(examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """Equally shaped examples as one batch."""
  return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}


def read(source: Sequence, indices: np.ndarray) -> list[Mapping[str, Any]]:
  """The examples at ``indices``, in one batched read where the source has one (TFDS's
  ``__getitems__`` reads ArrayRecord records in bulk)."""
  indices = [int(i) for i in indices]
  getitems = getattr(source, "__getitems__", None)
  if getitems is not None:
    try:
      return list(getitems(indices))
    except TypeError:  # tfds.testing.mock_data's __getitems__ cannot be called; a real error
      pass             # raises again from the one-by-one reads below
  return [source[i] for i in indices]


def take(source: Sequence, indices: np.ndarray) -> dict[str, np.ndarray]:
  """A batch of examples by index from any random-access source."""
  if isinstance(source, ArraySource):
    return source.take(indices)
  return stack(read(source, indices))


def to_memory(source: Sequence, chunk: int = 4096, progress: bool = False) -> ArraySource:
  """Reads a whole split into host memory (small and medium datasets: much faster batches)."""
  if isinstance(source, ArraySource):
    return source
  import tqdm
  n = len(source)
  arrays: dict[str, np.ndarray] = {}
  for i in tqdm.tqdm(range(0, n, chunk), desc="caching", unit="chunk", disable=not progress,
                     dynamic_ncols=True):
    part = take(source, np.arange(i, min(i + chunk, n)))
    if not arrays:  # filled in place: the split is held once, never twice while concatenating
      arrays = {k: np.empty((n, *v.shape[1:]), v.dtype) for k, v in part.items()}
    for k, v in part.items():
      arrays[k][i:i + len(v)] = v
  return ArraySource(arrays)


def decoded_size(source: Sequence, seed: int, sample: int = 16) -> tuple[float, bool]:
  """(estimated bytes of the whole split decoded, whether its examples all have one shape),
  from a seeded sample of ``sample`` examples: a split is never read whole to learn this."""
  n = len(source)
  indices = np.random.default_rng([seed, 5]).choice(n, min(n, sample), replace=False)
  examples = read(source, indices)
  nbytes = np.mean([sum(np.asarray(v).nbytes for v in e.values()) for e in examples])
  shapes = {tuple((k, np.shape(v)) for k, v in sorted(e.items())) for e in examples}
  return float(nbytes * n), len(shapes) == 1


# ------------------------------------------------------------------------------------------------
# Parsing 'kind:name[/config][:version]'.
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SourceKind:
  """One kind of ``data.source`` (``KIND:REST``), registered in ``SOURCE_KINDS``: ``check(rest)``
  refuses a bad name when the config is validated (nothing is read), ``open(rest, data_dir,
  seed)`` returns the ``Dataset``."""
  check: Callable[[str], None]
  open: Callable[[str, str, int], Dataset]


def parse_source(spec: str) -> tuple[str, str]:
  """Splits ``'kind:rest'`` and checks it (``SourceKind.check``)."""
  kind, sep, rest = str(spec).partition(":")
  if not sep or kind not in SOURCE_KINDS or not rest:
    raise ConfigError(f"data.source {spec!r} must look like one of "
                      f"{', '.join(k + ':NAME' for k in SOURCE_KINDS)}")
  SOURCE_KINDS.get(kind).check(rest)
  return kind, rest


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def open_dataset(data_config: Any, *, seed: int = 0) -> Dataset:
  """The ``Dataset`` named by ``data.source``."""
  kind, rest = parse_source(data_config.source)
  return SOURCE_KINDS.get(kind).open(rest, data_config.data_dir or default_data_dir(), seed)


def _check_bundled(rest: str) -> None:
  from deepflow.data.bundled import BUILDERS
  BUILDERS.get(rest.split("/")[0])  # an unknown name: one line listing the known ones


def _prepared_bundled(rest: str, data_dir: str):
  """The builder of a bundled dataset, prepared into ``data_dir`` on first use (offline: the
  data ships inside a Python package)."""
  builder = _bundled_builder(rest, data_dir)
  if not builder.is_prepared():
    import logging
    import tensorflow_datasets as tfds
    logging.getLogger("deepflow").info("preparing bundled:%s into %s (offline, once)", rest,
                                       data_dir)
    tfds.display_progress_bar(False)
    builder.download_and_prepare()
  return builder


def _open_bundled(rest: str, data_dir: str, seed: int) -> Dataset:
  return _from_builder(_prepared_bundled(rest, data_dir), f"bundled:{rest}")


def _open_tfds(rest: str, data_dir: str, seed: int) -> Dataset:
  return _from_builder(_tfds_builder(rest, data_dir), f"tfds:{rest}")


SOURCE_KINDS.register("bundled")(SourceKind(_check_bundled, _open_bundled))
SOURCE_KINDS.register("tfds")(SourceKind(lambda rest: None, _open_tfds))


def _bundled_builder(rest: str, data_dir: str):
  """``NAME[/CONFIG][/key=value,...]``: a named builder config, optionally with fields changed
  (e.g. ``bundled:co2/weekly/window=104,horizon=4``); each variant is prepared separately."""
  from deepflow.data.bundled import BUILDERS
  from deepflow.data.bundled.base import derive_config
  name, *parts = rest.split("/")
  cls = BUILDERS.get(name)
  overrides = {}
  if parts and "=" in parts[-1]:
    for item in parts.pop().split(","):
      key, sep, value = item.partition("=")
      if not sep:
        raise ConfigError(f"bad dataset option {item!r} in 'bundled:{rest}' (want key=value)")
      overrides[key.strip()] = value.strip()
  if len(parts) > 1:
    raise ConfigError(f"'bundled:{rest}' must look like bundled:NAME[/CONFIG][/key=value,...]")
  base = parts[0] if parts else None
  if base is None and not overrides:
    return cls(data_dir=data_dir)
  try:
    config = derive_config(cls, overrides, base=base)
    # Building the info checks the config against the data, e.g. that a forecasting window
    # fits in the series: a bad value is the user's, so it is reported in one line too.
    return cls(data_dir=data_dir, config=config)
  except ValueError as e:
    raise ConfigError(f"bundled dataset {name!r}: {e}") from e


def _tfds_builder(rest: str, data_dir: str):
  """A prepared TFDS builder, or a fast, clear error (never a download attempt)."""
  import tensorflow_datasets as tfds
  name = rest.split("/")[0].split(":")[0]
  try:
    builder = tfds.builder(rest, data_dir=data_dir, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ConfigError(f"unknown TFDS dataset {name!r}") from e
  except Exception as e:  # e.g. no prepared version and no code to build it here
    raise DatasetNotFoundError(_not_prepared(rest, data_dir)) from e
  if not builder.is_prepared():
    raise DatasetNotFoundError(_not_prepared(rest, data_dir))
  return builder


def _not_prepared(rest: str, data_dir: str) -> str:
  return (f"TFDS dataset {rest!r} is not prepared in {data_dir} and deepflow does not download "
          f"at run time; prepare it where there is network: `deepflow data prepare {rest} "
          f"--data_dir {data_dir}`, then set data.data_dir")


def open_splits(spec: str, data_dir: str) -> tuple[Any, Mapping[str, Sequence]]:
  """A prepared builder of a 'tfds' or 'bundled' source and its splits (each opened on first
  use), for readers of features other than the supervised keys (text corpora,
  ``deepflow.data.text``)."""
  kind, rest = parse_source(spec)
  builder = (_prepared_bundled if kind == "bundled" else _tfds_builder)(rest, data_dir)
  return builder, _TfdsSplits(builder, spec)


def _from_builder(builder, spec: str) -> Dataset:
  import tensorflow_datasets as tfds
  info = builder.info
  if not info.supervised_keys:
    raise ConfigError(f"dataset {spec!r} declares no supervised_keys (input, target)")
  input_key, target_key = info.supervised_keys[:2]
  target = info.features[target_key]
  num_classes = target.num_classes if isinstance(target, tfds.features.ClassLabel) else None
  splits = _TfdsSplits(builder, spec)
  return Dataset(name=spec, splits=splits, input_key=input_key, target_key=target_key,
                 num_classes=num_classes, metadata=dict(info.metadata or {}))


def _image_decoding(builder, split: str):
  """The split's data source with its ``Image`` features read as bytes and decoded by
  ``deepflow.data.images`` (faster than TFDS's own PIL decoding)."""
  import tensorflow_datasets as tfds
  from deepflow.data import images
  features = builder.info.features
  channels = {key: feature.shape[-1] for key, feature in features.items()
              if isinstance(feature, tfds.features.Image)}
  if not channels:
    return builder.as_data_source(split=split)
  skip = {key: tfds.decode.SkipDecoding() for key in channels}
  return images.DecodedSource(builder.as_data_source(split=split, decoders=skip), channels)


class _TfdsSplits(Mapping):
  """A builder's splits, each opened (``as_data_source``) on first use."""

  def __init__(self, builder, spec: str):
    self.builder, self.spec, self._open = builder, spec, {}

  def __getitem__(self, name: str):
    if name not in self._open:
      try:
        self._open[name] = _image_decoding(self.builder, name)
      except (KeyError, ValueError) as e:
        raise KeyError(name) from e
      except Exception as e:  # e.g. prepared as TFRecord, which needs TensorFlow to read
        raise DatasetNotFoundError(f"dataset {self.spec!r} cannot be read without TensorFlow "
                                   f"({type(e).__name__}); prepare it with "
                                   f"--file_format=array_record") from e
    return self._open[name]

  def __contains__(self, name: object) -> bool:
    try:
      self[name]
      return True
    except KeyError:
      return False

  def __iter__(self):
    return iter(list(self.builder.info.splits.keys()))

  def __len__(self) -> int:
    return len(self.builder.info.splits)


# ------------------------------------------------------------------------------------------------
# Synthetic datasets (tests and benchmarks): deterministic from the seed, in memory.
# ------------------------------------------------------------------------------------------------

def _synthetic(name: str) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
  return DATASETS.register(f"synthetic:{name}")


@_synthetic("digits_like")
def synthetic_images(seed: int = 0, train_size: int = 2048, test_size: int = 512,
                     shape: tuple[int, ...] = (8, 8, 1), num_classes: int = 10) -> Dataset:
  """Class-dependent prototype images plus noise: learnable, digits-shaped, instant to build."""
  rng = np.random.default_rng(seed)
  prototypes = rng.normal(size=(num_classes, *shape)).astype(np.float32)

  def split(n):
    labels = rng.integers(0, num_classes, n)
    images = prototypes[labels] + 0.7 * rng.normal(size=(n, *shape)).astype(np.float32)
    return ArraySource({"image": images.astype(np.float32), "label": labels.astype(np.int64)})
  return Dataset("synthetic:digits_like", {"train": split(train_size), "test": split(test_size)},
                 "image", "label", num_classes)


@_synthetic("imagenet_like")
def synthetic_imagenet(seed: int = 0, train_size: int = 1024, test_size: int = 256,
                       size: int = 224, num_classes: int = 1000) -> Dataset:
  """ImageNet-shaped uint8 images (224x224x3, 1000 classes): each class a random 14x14 colour
  pattern scaled up, the same for all its images. Not a benchmark: it gives an ImageNet
  experiment its shapes (``deepflow plan``) and a smoke test where ImageNet is not prepared,
  in 193 MB of memory."""
  rng = np.random.default_rng(seed)
  cell = max(size // 14, 1)
  patterns = rng.integers(0, 256, (num_classes, -(-size // cell), -(-size // cell), 3), np.uint8)

  def split(n):
    labels = rng.integers(0, num_classes, n)
    images = patterns[labels].repeat(cell, axis=1).repeat(cell, axis=2)[:, :size, :size]
    return ArraySource({"image": images, "label": labels.astype(np.int64)})
  return Dataset("synthetic:imagenet_like", {"train": split(train_size),
                                             "test": split(test_size)}, "image", "label",
                 num_classes)


@_synthetic("regression")
def synthetic_regression(seed: int = 0, train_size: int = 1024, test_size: int = 256,
                         features: int = 8) -> Dataset:
  """y = w.x + 0.1 noise: a regression problem with a known optimum."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(features, 1)).astype(np.float32)

  def split(n):
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = x @ w + 0.1 * rng.normal(size=(n, 1)).astype(np.float32)
    return ArraySource({"features": x, "targets": y})
  return Dataset("synthetic:regression", {"train": split(train_size), "test": split(test_size)},
                 "features", "targets", None)


def _check_synthetic(rest: str) -> None:
  DATASETS.get(f"synthetic:{rest}")


SOURCE_KINDS.register("synthetic")(SourceKind(
    _check_synthetic, lambda rest, data_dir, seed: DATASETS.get(f"synthetic:{rest}")(seed=seed)))
