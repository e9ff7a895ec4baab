"""Search spaces and trials: ``--sweep KEY=V1,V2`` or ``KEY=loguniform(A,B)`` axes, the grid (or
random draws) of override sets they make, and the config of one trial."""
from __future__ import annotations

import dataclasses
import itertools
import math
import re
from typing import Any, Iterable, Sequence

import numpy as np
from ml_collections import ConfigDict

from deepflow import config as config_lib
from deepflow.registry import ConfigError


@dataclasses.dataclass(frozen=True)
class Axis:
  """One swept key: a list of values, or (random search only) a range ``uniform(a,b)``,
  ``loguniform(a,b)`` or ``randint(a,b)`` (both ends included)."""
  key: str
  values: tuple = ()
  distribution: str = ""
  low: float = 0.0
  high: float = 0.0

  def sample(self, rng: np.random.Generator) -> Any:
    if not self.distribution:
      return self.values[rng.integers(len(self.values))]
    if self.distribution == "randint":
      return int(rng.integers(int(self.low), int(self.high) + 1))
    if self.distribution == "loguniform":
      value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
    else:
      value = rng.uniform(self.low, self.high)
    return float(f"{value:.4g}")  # readable overrides and trial names


_RANGE = re.compile(r"^(uniform|loguniform|randint)\(\s*([^,]+)\s*,\s*([^,]+)\s*\)$")


def parse_axis(text: str) -> Axis:
  """``key=v1,v2,...`` (values as on the command line; commas inside brackets stay) or
  ``key=loguniform(1e-4,1e-2)`` and friends."""
  key, sep, rest = text.partition("=")
  if not sep or not key or not rest:
    raise ConfigError(f"--sweep {text!r} is not KEY=V1,V2,... or KEY=loguniform(A,B)")
  match = _RANGE.match(rest.strip())
  if match:
    kind, low, high = match.group(1), config_lib.parse_value(match.group(2)), \
        config_lib.parse_value(match.group(3))
    if not all(isinstance(v, (int, float)) for v in (low, high)) or not low < high or (
        kind == "loguniform" and low <= 0):
      raise ConfigError(f"--sweep {text!r}: need numbers 0 < low < high for {kind}")
    return Axis(key.strip(), distribution=kind, low=low, high=high)
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(rest):
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      parts.append(rest[start:i])
      start = i + 1
  parts.append(rest[start:])
  if any(not p.strip() for p in parts):
    raise ConfigError(f"--sweep {text!r} has an empty value")
  return Axis(key.strip(), values=tuple(config_lib.parse_value(p.strip()) for p in parts))


def make_trials(axes: Sequence[Axis], trials: int = 0, seed: int = 0) -> list[dict[str, Any]]:
  """The trials' overrides: the full grid (``trials`` = 0), or ``trials`` random draws, each key
  independently (deterministic from ``seed``, so a rerun finds the same trials)."""
  keys = [a.key for a in axes]
  if len(set(keys)) != len(keys):
    raise ConfigError(f"a key is swept twice: {', '.join(keys)}")
  if trials <= 0:
    ranged = [a.key for a in axes if a.distribution]
    if ranged:
      raise ConfigError(f"{', '.join(ranged)}: a range needs random search (--trials N)")
    return [dict(zip(keys, combo)) for combo in itertools.product(*(a.values for a in axes))]
  rng = np.random.default_rng(seed)
  return [{a.key: a.sample(rng) for a in axes} for _ in range(trials)]


def overrides_of(trial: dict[str, Any]) -> list[str]:
  return [f"{k}={v!r}" for k, v in trial.items()]


def trial_config(base: str | ConfigDict, overrides: Iterable[str]) -> ConfigDict:
  """A trial's config: the experiment file (or a config) with the overrides, validated."""
  if isinstance(base, ConfigDict):
    return config_lib.finalize(ConfigDict(base.to_dict()), overrides)
  return config_lib.load_config(base, overrides)
