"""Preprocessing transforms: named, configured, fitted on the train split only, then applied to
every batch (train and eval alike) on the host.

A config lists them in order, e.g. ``data.transforms = [dict(name='impute', strategy='median'),
dict(name='standardize')]``. Like an optax chain, each transform is a small pair of functions:
``fit(train_chunks) -> stats`` and ``apply(stats, values, rng) -> values``. ``fit`` reads the
train sample once, chunk by chunk (moments are accumulated, so host memory holds one chunk, not
the sample). Fitted statistics are saved in the workdir (``preprocessing.npz``) so eval,
resumption and export reuse exactly them.
"""
from __future__ import annotations

import collections
import dataclasses
import io
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from etils import epath

from deepflow.atomic import write_atomic
from deepflow.registry import ConfigError, TRANSFORMS

Stats = dict[str, np.ndarray]
EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Transform:
  """One preprocessing step. ``keys`` name the features it touches ('input' and 'target' mean
  the dataset's supervised keys); statistics are fitted on the first key and shared by the rest
  (e.g. the same scaling for a series' past values and its future targets)."""
  fit: Callable[[Iterable[np.ndarray]], Stats]   # one pass over the train sample's chunks
  apply: Callable[[Stats, np.ndarray, np.random.Generator], np.ndarray]
  keys: tuple[str, ...] = ("input",)
  train_only: bool = False            # augmentations: training batches only
  handles_missing: bool = False       # imputation: NaN in, no NaN out
  invert: Callable[[Stats, Any], Any] | None = None  # back to the data's units (see ``inverse``)
  numeric: bool = True                # False: gets the feature as stored (text), not as float32
  # True: applied to each example before batching (``deepflow.data.images``: variable-size
  # images), ``apply(stats, value, rng)`` on one example's feature value (e.g. an image), with
  # stats ``{}`` and rng None at eval; nothing to fit.
  per_example: bool = False


def build_transforms(entries: Sequence[Mapping[str, Any]]) -> list[Transform]:
  """The transforms a config lists, built from the registry with their options."""
  out = []
  for entry in entries:
    options = {k: v for k, v in dict(entry).items() if k != "name"}
    if "keys" in options:
      options["keys"] = tuple(options["keys"])
    factory = TRANSFORMS.get(entry["name"])
    try:
      out.append(factory(**options))
    except TypeError as e:
      raise ConfigError(f"transform {entry['name']!r}: {e}") from e
  return out


def array_module(*arrays: Any) -> Any:
  """numpy for host arrays, jax.numpy if any is a JAX array: the eval-time ``apply`` functions
  also run traced, inside the inference function that ``deepflow export`` serializes."""
  import jax
  if any(isinstance(a, jax.Array) for a in arrays):
    import jax.numpy as jnp
    return jnp
  return np


def _reduce_axes(values: np.ndarray, per: str) -> tuple[int, ...]:
  """Axes to reduce over: 'feature' keeps every non-batch axis, 'channel' only the last one,
  'global' none; 'auto' is per-feature for (B, F) tables and per-channel for sequences (B, T, C)
  and images (B, H, W, C), so a series' targets can share its inputs' statistics."""
  if per == "auto":
    per = "channel" if values.ndim >= 3 else "feature"
  if per == "feature":
    return (0,)
  if per == "channel":
    return tuple(range(values.ndim - 1))
  if per == "global":
    return tuple(range(values.ndim))
  raise ConfigError(f"unknown normalization axis {per!r}; known: auto, feature, channel, global")


class Moments:
  """Count, mean, sum of squared deviations, min and max of values added chunk by chunk, reduced
  over the axes ``per`` names (``_reduce_axes``), NaN ignored: what ``np.nanmean``, ``nanstd``,
  ``nanmin`` and ``nanmax`` give on the chunks concatenated, in float64, holding one chunk at a
  time. Chunks are merged with Chan, Golub and LeVeque's pairwise update (no cancellation)."""

  BLOCK = 1 << 22  # values reduced at once: float64 temporaries of ~32 MB, whatever the chunk

  def __init__(self, per: str):
    self.per, self.count = per, None

  @classmethod
  def of(cls, chunks: Iterable[np.ndarray], per: str) -> "Moments":
    moments = cls(per)
    for values in chunks:
      moments.add(values)
    if moments.count is None:
      raise ConfigError("transform statistics need at least one train example; the sample is "
                        "empty")
    return moments

  def add(self, values: np.ndarray) -> None:
    rows = max(1, self.BLOCK // max(1, int(np.prod(np.shape(values)[1:]))))
    for start in range(0, len(values), rows):
      self._merge(values[start:start + rows])

  def _merge(self, values: np.ndarray) -> None:
    # The reduced axes are a prefix (``_reduce_axes``), so the kept ones are trailing: as a
    # (rows, columns) matrix, column j belongs to statistic j % groups. Reducing over the rows
    # first (wide, contiguous: matrix-vector products) then over each statistic's columns is
    # many times faster than numpy's reductions over axes (0, 1, 2) of (B, H, W, 3) images.
    values = np.asarray(values)
    k = len(_reduce_axes(values, self.per))
    shape = tuple(1 if a < k else n for a, n in enumerate(values.shape))[1:]
    groups = int(np.prod(values.shape[k:]))
    x = values.astype(np.float64).reshape(len(values), -1)

    def per_statistic(columns, reduce):
      return reduce(columns.reshape(-1, groups), axis=0).reshape(shape)
    missing = np.isnan(x)
    with np.errstate(invalid="ignore", divide="ignore"):
      if missing.any():
        present = ~missing
        count = per_statistic(present.sum(axis=0), np.sum)
        mean = per_statistic(np.where(present, x, 0.0).sum(axis=0), np.sum) / count
        deviations = np.where(present, x - np.tile(mean.ravel(), x.shape[1] // groups), 0.0)
        low = per_statistic(np.where(present, x, np.inf).min(axis=0), np.min)
        high = per_statistic(np.where(present, x, -np.inf).max(axis=0), np.max)
      else:
        count = np.full(shape, x.size // groups)
        mean = per_statistic(np.ones(len(x)) @ x, np.sum) / count
        deviations = x - np.tile(mean.ravel(), x.shape[1] // groups)
        low = per_statistic(x.min(axis=0), np.min)
        high = per_statistic(x.max(axis=0), np.max)
      m2 = per_statistic(np.ones(len(x)) @ np.square(deviations, out=deviations), np.sum)
    if self.count is None:
      self.count, self.mean, self.m2, self._low, self._high = count, mean, m2, low, high
      return
    total = self.count + count
    with np.errstate(invalid="ignore", divide="ignore"):
      delta = np.where(count > 0, mean - self.mean, 0.0)
      share = np.where(total > 0, count / total, 0.0)
      self.mean = np.where(self.count > 0, self.mean + delta * share, mean)
      self.m2 = np.where(self.count > 0, self.m2 + m2 + delta ** 2 * self.count * share, m2)
    self.count, self._low, self._high = total, np.minimum(self._low, low), np.maximum(
        self._high, high)

  def std(self) -> np.ndarray:
    """The population standard deviation (``np.std``'s default, ddof 0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
      return np.sqrt(self.m2 / self.count)

  @property
  def min(self) -> np.ndarray:
    return np.where(self.count > 0, self._low, np.nan)

  @property
  def max(self) -> np.ndarray:
    return np.where(self.count > 0, self._high, np.nan)


@TRANSFORMS.register("standardize")
def standardize(per: str = "auto", keys: tuple[str, ...] = ("input",)) -> Transform:
  """(x - mean) / std, statistics from the train split. A feature constant in train is only
  centred (std taken as 1, as scikit-learn does), so an eval value off that constant stays finite
  instead of being divided by ~0."""
  _reduce_axes(np.zeros((1, 1, 1, 1)), per)  # validate the option at build time

  def fit(chunks):
    moments = Moments.of(chunks, per)
    std = moments.std()
    return {"mean": moments.mean.astype(np.float32),
            "std": np.where(std < EPS, 1.0, std).astype(np.float32)}

  def apply(stats, values, rng):
    return ((values - stats["mean"]) / stats["std"]).astype(np.float32)

  def invert(stats, values):
    return (values * stats["std"] + stats["mean"]).astype(np.float32)
  return Transform(fit, apply, keys, invert=invert)


@TRANSFORMS.register("minmax")
def minmax(per: str = "auto", low: float = 0.0, high: float = 1.0,
           keys: tuple[str, ...] = ("input",)) -> Transform:
  """Linear rescaling of the train split's [min, max] to [low, high] (a feature constant in train
  is shifted to ``low``, its range taken as 1, as scikit-learn does)."""
  _reduce_axes(np.zeros((1, 1, 1, 1)), per)

  def fit(chunks):
    moments = Moments.of(chunks, per)
    return {"min": moments.min.astype(np.float32), "max": moments.max.astype(np.float32)}

  def apply(stats, values, rng):
    span = stats["max"] - stats["min"]
    scale = (high - low) / array_module(values, span).where(span < EPS, 1.0, span)
    return (low + (values - stats["min"]) * scale).astype(np.float32)

  def invert(stats, values):
    span = stats["max"] - stats["min"]
    scale = (high - low) / array_module(values, span).where(span < EPS, 1.0, span)
    return ((values - low) / scale + stats["min"]).astype(np.float32)
  return Transform(fit, apply, keys, invert=invert)


@TRANSFORMS.register("impute")
def impute(strategy: str = "mean", fill_value: float = 0.0, indicator: bool = False,
           keys: tuple[str, ...] = ("input",)) -> Transform:
  """Replaces NaN by the train split's per-feature mean or median, or a constant; with
  ``indicator=True`` appends one 0/1 "was missing" feature per input feature (vector inputs)."""
  if strategy not in ("mean", "median", "constant"):
    raise ConfigError(f"impute strategy {strategy!r}; known: mean, median, constant")

  def fit(chunks):
    if strategy == "constant":
      fill = np.full(next(iter(chunks)).shape[1:], fill_value, np.float32)
    elif strategy == "mean":
      fill = Moments.of(chunks, "feature").mean
    else:  # a median needs the whole sample (tables: a few MB at data.stats_examples rows)
      fill = np.nanmedian(np.concatenate(list(chunks)), axis=0)
    fill = np.where(np.isnan(fill), fill_value, fill)  # a feature missing everywhere
    return {"fill": fill.astype(np.float32)}

  def apply(stats, values, rng):
    xp = array_module(values, stats["fill"])
    missing = xp.isnan(values)
    filled = xp.where(missing, stats["fill"], values).astype(np.float32)
    if indicator:
      filled = xp.concatenate([filled, missing.astype(np.float32)], axis=-1)
    return filled
  return Transform(fit, apply, keys, handles_missing=True)


# ------------------------------------------------------------------------------------------------
# Fitting a chain and applying it to batches.
# ------------------------------------------------------------------------------------------------

def check_order(transforms: Sequence[Transform], names: Sequence[str]) -> None:
  """Per-example transforms run before batching, so they must lead the list."""
  first_batch = None
  for t, name in zip(transforms, names):
    if not t.per_example:
      first_batch = first_batch or name
    elif first_batch:
      raise ConfigError(f"transform {name!r} works on single examples and must come before "
                        f"{first_batch!r} in data.transforms")


def resolve_key(key: str, input_key: str, target_key: str) -> str:
  return {"input": input_key, "target": target_key}.get(key, key)


def fit_chain(transforms: Sequence[Transform],
              chunks: Callable[[], Iterable[Mapping[str, np.ndarray]]],
              input_key: str, target_key: str) -> list[Stats]:
  """Fits each transform in order on the train sample as transformed by the ones before it:
  ``chunks()`` yields the sample in batches, read once per fitted transform (once at all when
  none is), so host memory holds one batch at a time. Rejects NaN inputs that no imputation
  handles: silent NaN training is never what one wants."""
  all_stats: list[Stats] = [{} for _ in transforms]
  fitted = [i for i, t in enumerate(transforms) if not (t.train_only or t.per_example)]
  missing = {input_key: [0, 0], target_key: [0, 0]}  # NaN entries, entries
  for n, i in enumerate(fitted or [len(transforms)]):
    last = n == max(len(fitted) - 1, 0)
    passed = _through(transforms[:i], all_stats, chunks(), input_key, target_key,
                      missing if last else None)
    if i < len(transforms):
      t = transforms[i]
      key = resolve_key(t.keys[0], input_key, target_key)
      all_stats[i] = t.fit(_as_input(t, values[key]) for values in passed)
    if last:  # a fit may stop early (a constant reads one chunk); the NaN count needs them all
      collections.deque(passed, maxlen=0)
  # The check ran on what enters the last fitted transform; after it, values are NaN exactly
  # where they were before (finite statistics), unless it imputes them.
  imputed = {resolve_key(k, input_key, target_key) for i in fitted[-1:]
             if transforms[i].handles_missing for k in transforms[i].keys}
  for key, (nans, total) in missing.items():
    if nans and key not in imputed:
      raise ConfigError(f"feature {key!r} has missing values (NaN, {nans / total:.1%} of "
                        f"entries) and no imputation handles them; add dict(name='impute') to "
                        f"data.transforms")
  return all_stats


def _through(transforms: Sequence[Transform], stats: Sequence[Stats],
             chunks: Iterable[Mapping[str, np.ndarray]], input_key: str, target_key: str,
             missing: dict[str, list[int]] | None) -> Iterator[dict[str, np.ndarray]]:
  """The chunks through the fitted ``transforms`` (augmentations skipped), counting the NaN
  entries of the input and target features in ``missing`` when given."""
  for chunk in chunks:
    values = {k: np.asarray(v) for k, v in chunk.items()}
    for t, s in zip(transforms, stats):
      if not (t.train_only or t.per_example):
        for k in t.keys:
          k = resolve_key(k, input_key, target_key)
          values[k] = t.apply(s, _as_input(t, values[k]), None)
    for key, counts in (missing or {}).items():
      if np.issubdtype(values[key].dtype, np.floating):
        counts[0] += int(np.isnan(values[key]).sum())
        counts[1] += values[key].size
    yield values


def apply_chain(transforms: Sequence[Transform], stats: Sequence[Stats],
                batch: Mapping[str, np.ndarray], input_key: str, target_key: str, *,
                train: bool, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
  """Applies fitted transforms to one batch (augmentations only when ``train``). An eval batch
  still holding NaN inputs is refused (``fit_chain`` checked only the train split)."""
  batch = dict(batch)
  for t, s in zip(transforms, stats):
    if (t.train_only and not train) or t.per_example:  # per-example ones ran before batching
      continue
    for key in t.keys:
      key = resolve_key(key, input_key, target_key)
      batch[key] = t.apply(s, _as_input(t, batch[key]), rng)
  inputs = batch[input_key]
  if not train and np.issubdtype(inputs.dtype, np.floating) and np.isnan(inputs).any():
    raise ConfigError(f"feature {input_key!r} of an eval batch has missing values (NaN) that no "
                      f"imputation handles; add dict(name='impute') to data.transforms")
  return batch


def _as_input(t: Transform, values: np.ndarray) -> np.ndarray:
  """A feature as ``t`` takes it: float32 for numeric transforms, as stored (text) otherwise."""
  return values.astype(np.float32) if t.numeric else values


def inverse(transforms: Sequence[Transform], stats: Sequence[Stats], key: str, input_key: str,
            target_key: str) -> Callable[[Any], Any] | None:
  """The map from feature ``key``'s preprocessed values back to the dataset's units: the inverses
  of the fitted transforms on it, last first (the identity when none touches it); None when one
  of them has no inverse. Works on numpy and traced JAX arrays alike, so a task can report
  errors in the data's units (a forecast's in ppm, not in standard deviations)."""
  steps = []
  for t, s in zip(transforms, stats):
    if t.train_only or key not in {resolve_key(k, input_key, target_key) for k in t.keys}:
      continue
    if t.invert is None:
      return None
    steps.append((t, s))

  def invert(values):
    for t, s in reversed(steps):
      values = t.invert(s, values)
    return values
  return invert


def save_stats(path: str, stats: Sequence[Stats]) -> None:
  """Writes fitted statistics (local path or URL); written whole, then renamed, so a crash
  never leaves half a file."""
  flat = {f"{i}/{k}": v for i, s in enumerate(stats) for k, v in s.items()}
  buffer = io.BytesIO()
  np.savez(buffer, __count__=np.array(len(stats)), **flat)
  write_atomic(path, buffer.getvalue())


def load_stats(path: str) -> list[Stats]:
  with np.load(io.BytesIO(epath.Path(path).read_bytes())) as f:
    stats: list[Stats] = [{} for _ in range(int(f["__count__"]))]
    for name in f.files:
      if name != "__count__":
        i, key = name.split("/", 1)
        stats[int(i)][key] = f[name]
  return stats

