"""Shared pieces of the bundled TFDS builders: data that a well-kept package ships, written as
ArrayRecord so it is read exactly like any TFDS dataset (``tfds.data_source``), offline.

Besides the base builder this holds what several dataset families share: deriving a builder
config from overrides (``bundled:co2/window=36``), the time split and sliding windows of the
forecasting builders, and the stratified split of the tabular ones."""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow_datasets as tfds

from deepflow.registry import Registry

if TYPE_CHECKING:  # pandas (about 0.4 s to import) loads only where a series is built
  import pandas as pd


# ``bundled:NAME`` -> its builder class, filled by ``register_builder`` in the modules that
# ``deepflow.data.bundled`` imports.
BUILDERS: Registry = Registry("bundled dataset")


def register_builder(name: str):
  """Class decorator: the builder is the dataset ``bundled:NAME``."""
  return BUILDERS.register(name)


class BundledBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of deepflow's offline builders: ArrayRecord output, no download step."""

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)


def time_split_indices(length: int, test_fraction: float) -> int:
  """Index of the first test time step when the last ``test_fraction`` of a series is held out."""
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  return int(round(length * (1.0 - test_fraction)))


# --------------------------------------------------------------------------------------------
# Builder configs from overrides.

_BASE_FIELDS = frozenset(f.name for f in dataclasses.fields(tfds.core.BuilderConfig))


def config_fields(config: tfds.core.BuilderConfig) -> dict[str, Any]:
  """The dataset's own fields of a builder config (TFDS's name, version, ... left out)."""
  return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
          if f.name not in _BASE_FIELDS}


def _cast(value: Any, like: Any, key: str) -> Any:
  """``value`` (often a string from a config string) as the type of the field's value ``like``."""
  if isinstance(like, bool):
    if isinstance(value, str):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"{key} must be true or false, got {value!r}")
      return value.lower() in ("true", "1")
    return bool(value)
  if isinstance(like, int):
    if isinstance(value, float) and not value.is_integer():
      raise ValueError(f"{key} must be an integer, got {value!r}")
    return int(value)
  return type(like)(value)


def derive_config(builder_cls: type[tfds.core.DatasetBuilder], overrides: Mapping[str, Any],
                  base: str | None = None) -> tfds.core.BuilderConfig:
  """A config of ``builder_cls``: the named ``base`` config (default: the builder's default) with
  ``overrides`` applied.

  Values may be strings, as parsed from ``bundled:co2/weekly/window=52``; each is cast to its
  field's type. A derived config is named after its base and the fields it changes
  (``weekly-window52``), so every variant is prepared into its own directory; with no change
  the base config itself is returned (TFDS refuses a different config under a known name)."""
  configs = {c.name: c for c in builder_cls.BUILDER_CONFIGS}
  if not configs:
    raise ValueError(f"{builder_cls.__name__} has no builder configs to override")
  if base is None:
    config = builder_cls.default_builder_config
  elif base in configs:
    config = configs[base]
  else:
    raise ValueError(f"{builder_cls.__name__} has no config {base!r}; known: {sorted(configs)}")
  fields = config_fields(config)
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ValueError(f"unknown field(s) {unknown} for {builder_cls.__name__}; "
                     f"known: {sorted(fields)}")
  changed = {k: _cast(v, fields[k], k) for k, v in overrides.items()}
  changed = {k: v for k, v in changed.items() if v != fields[k]}
  if not changed:
    return config
  suffix = "-".join(f"{k}{changed[k]}" for k in fields if k in changed)
  description = f"Config {config.name!r} with " + ", ".join(
      f"{k}={v}" for k, v in changed.items()) + "."
  return dataclasses.replace(config, name=f"{config.name}-{suffix}", description=description,
                             **changed)


# --------------------------------------------------------------------------------------------
# Forecasting: sliding windows over one series, split by time.

@dataclasses.dataclass(eq=False)
class WindowConfig(tfds.core.BuilderConfig):
  """Sliding-window forecasting: ``window`` past steps in, the next ``horizon`` steps out; the
  last ``test_fraction`` of the series is the test period."""
  window: int = 12
  horizon: int = 1
  test_fraction: float = 0.2

  def __post_init__(self):
    if self.window < 1 or self.horizon < 1:
      raise ValueError(f"window and horizon must be >= 1, got {self.window}, {self.horizon}")
    if not 0.0 < self.test_fraction < 1.0:
      raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


def window_times(length: int, window: int, horizon: int, cut: int) -> dict[str, range]:
  """Per split, the times ``t`` (index of the first target step) of every window.

  Train: inputs [t - window, t) and targets [t, t + horizon) all before ``cut``. Test: targets
  at or after ``cut``; inputs may reach back before it (the past, not leakage). Stride 1."""
  times = {"train": range(window, cut - horizon + 1), "test": range(max(cut, window),
                                                                   length - horizon + 1)}
  for split, ts in times.items():
    if not ts:
      raise ValueError(f"no {split} windows: series of {length} steps cut at {cut} is too short "
                       f"for window={window}, horizon={horizon}")
  return times


def _time_label(value: Any) -> str:
  """A series' index value as text for metadata: ISO date for timestamps, else ``str``."""
  import pandas as pd
  return value.date().isoformat() if isinstance(value, pd.Timestamp) else str(value)


class WindowedSeriesBuilder(BundledBuilder, skip_registration=True):
  """Windows ``{'inputs': (window, 1), 'targets': (horizon,), 'time': t}`` over one float series.

  ``time`` is the index of the first target step in the series; the split is by time at
  ``time_split_indices(len(series), test_fraction)`` (see ``window_times``). Examples are stored
  in time order. No normalization: deepflow normalizes from train statistics."""
  VERSION = tfds.core.Version("1.0.0")
  HOMEPAGE = ""

  def _series(self) -> tuple[pd.Series, dict[str, Any]]:
    """The series for this config (index: time; values: float, no NaN) and extra metadata."""
    raise NotImplementedError

  @functools.cached_property
  def _data(self) -> tuple[np.ndarray, dict[str, Any]]:
    """The series values as float32 and the dataset metadata, computed once per builder."""
    series, extra = self._series()
    values = series.to_numpy(dtype=np.float32)
    if np.isnan(values).any():
      raise ValueError(f"{self.name}: series still has NaN after gap filling")
    cfg = self.builder_config
    cut = time_split_indices(len(values), cfg.test_fraction)
    times = window_times(len(values), cfg.window, cfg.horizon, cut)
    metadata = {
        **config_fields(cfg),
        "length": len(values), "cut": cut,
        "start": _time_label(series.index[0]), "end": _time_label(series.index[-1]),
        "cut_time": _time_label(series.index[cut]),
        "split_sizes": {split: len(ts) for split, ts in times.items()},
        "time": "index of the first target step: inputs are steps [time - window, time), "
                "targets [time, time + horizon)",
        **extra,
    }
    return values, metadata

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "inputs": tfds.features.Tensor(shape=(cfg.window, 1), dtype=np.float32),
            "targets": tfds.features.Tensor(shape=(cfg.horizon,), dtype=np.float32),
            "time": tfds.features.Tensor(shape=(), dtype=np.int32),
        }),
        supervised_keys=("inputs", "targets"),
        homepage=self.HOMEPAGE,
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(self._data[1]),
    )

  def _split_generators(self, dl_manager):
    values, metadata = self._data
    cfg = self.builder_config
    times = window_times(len(values), cfg.window, cfg.horizon, metadata["cut"])
    return {split: self._generate_examples(values, ts) for split, ts in times.items()}

  def _generate_examples(self, values: np.ndarray, times: range):
    cfg = self.builder_config
    for t in times:
      yield t, {"inputs": values[t - cfg.window:t, None], "targets": values[t:t + cfg.horizon],
                "time": t}


# --------------------------------------------------------------------------------------------
# Tables: labelled rows with a fixed stratified split.

def stratified_split(strata: np.ndarray, test_size: float = 0.2,
                     seed: int = 0) -> dict[str, np.ndarray]:
  """Positions (sorted) of a fixed stratified train/test split over ``strata``, one per row."""
  from sklearn.model_selection import train_test_split
  train, test = train_test_split(np.arange(len(strata)), test_size=test_size,
                                 random_state=seed, stratify=strata)
  return {"train": np.sort(train), "test": np.sort(test)}


@dataclasses.dataclass
class Table:
  """One labelled table, as a ``TableBuilder`` writes it."""
  features: np.ndarray  # (n, d) float; NaN marks a missing value
  labels: np.ndarray  # (n,) int class ids
  feature_names: list[str]
  class_names: list[str]
  rows: np.ndarray | None = None  # each example's row in the source table; default 0..n-1
  strata: np.ndarray | None = None  # what the split stratifies on; default the labels
  extra: dict[str, tuple[tfds.features.FeatureConnector, np.ndarray]] = dataclasses.field(
      default_factory=dict)  # more per-row features: name -> (TFDS feature, values)
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


class TableBuilder(BundledBuilder, skip_registration=True):
  """Rows ``{'features': float32 (d,), 'label': ClassLabel, 'row': int32, ...}`` of a table.

  ``row`` is the example's row in the source table, so any example can be traced back to it.
  Split: fixed stratified 80/20 train/test (seed 0), the same on every machine."""
  VERSION = tfds.core.Version("1.0.0")
  HOMEPAGE = ""

  def _table(self) -> Table:
    """The table for this builder (and config)."""
    raise NotImplementedError

  @functools.cached_property
  def _data(self) -> tuple[Table, dict[str, np.ndarray]]:
    """The table and its split positions, computed once per builder."""
    table = self._table()
    n = len(table.labels)
    if table.rows is None:
      table.rows = np.arange(n)
    splits = stratified_split(table.labels if table.strata is None else table.strata)
    return table, splits

  def _info(self) -> tfds.core.DatasetInfo:
    table, splits = self._data
    features = {
        "features": tfds.features.Tensor(shape=(len(table.feature_names),), dtype=np.float32),
        "label": tfds.features.ClassLabel(names=[str(n) for n in table.class_names]),
        "row": tfds.features.Tensor(shape=(), dtype=np.int32),
    }
    features.update({name: feature for name, (feature, _) in table.extra.items()})
    metadata = {"feature_names": [str(n) for n in table.feature_names],
                "split_sizes": {k: len(v) for k, v in splits.items()},
                "label_counts": {k: np.bincount(table.labels[v], minlength=len(
                    table.class_names)).tolist() for k, v in splits.items()},
                **table.metadata}
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(features),
        supervised_keys=("features", "label"),
        homepage=self.HOMEPAGE,
        metadata=tfds.core.MetadataDict(metadata),
    )

  def _split_generators(self, dl_manager):
    table, splits = self._data
    return {split: self._generate_examples(table, ix) for split, ix in splits.items()}

  def _generate_examples(self, table: Table, positions: np.ndarray):
    features = table.features.astype(np.float32)
    for i in positions:
      example = {"features": features[i], "label": int(table.labels[i]),
                 "row": int(table.rows[i])}
      example.update({name: values[i].item() if np.ndim(values[i]) == 0 else values[i]
                      for name, (_, values) in table.extra.items()})
      yield int(table.rows[i]), example
