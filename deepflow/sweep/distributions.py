"""A search space for an Optuna study: ``--sweep`` axes as Optuna distributions, suggested per
trial, with conditional keys.

The syntax is ``space.parse_axis``'s (``KEY=V1,V2,...``, ``KEY=uniform(A,B)``,
``KEY=loguniform(A,B)``, ``KEY=randint(A,B)``) plus ``KEY=choice(V1,V2,...)`` (the same as a
list of values) and a condition, ``KEY=...@OTHER=VALUE``: the key is suggested (and set) only in
trials whose ``OTHER`` (itself swept) took ``VALUE``, as Optuna's define-by-run spaces allow, e.g.
``optimizer.momentum=uniform(0.5,0.99)@optimizer.name=sgd``.

Values that Optuna cannot hold as categories (tuples, lists) are held as their Python text and
turned back into values when the trial's config is made.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Sequence

from ml_collections import ConfigDict

from deepflow import config as config_lib
from deepflow.registry import ConfigError
from deepflow.sweep.space import _RANGE, Axis, parse_axis

_CHOICE = re.compile(r"^choice\((.*)\)$")
_CALL = re.compile(r"^(choice|uniform|loguniform|randint)\s*\(")  # well-formed or not
_PLAIN = (str, int, float, bool, type(None))


@dataclasses.dataclass(frozen=True)
class Param:
  """One swept key of a study: its axis and, for a conditional key, the (key, value) it needs."""
  axis: Axis
  when: tuple[str, Any] | None = None

  @property
  def key(self) -> str:
    return self.axis.key


def parse_param(text: str) -> Param:
  """One ``--sweep`` text of a study (see the module docstring)."""
  body, at, condition = text.partition("@")
  when = None
  if at:
    key, eq, value = condition.partition("=")
    if not eq or not key.strip() or not value.strip():
      raise ConfigError(f"--sweep {text!r}: the condition after '@' must be KEY=VALUE")
    when = (key.strip(), config_lib.parse_value(value.strip()))
  key, eq, rest = body.partition("=")
  match = _CHOICE.match(rest.strip())
  if eq and match:
    body = f"{key}={match.group(1)}"
  elif _CALL.match(rest.strip()) and not _RANGE.match(rest.strip()):
    raise ConfigError(f"--sweep {text!r} is not KEY=V1,V2,..., KEY=choice(V1,...) or "
                      f"KEY=uniform|loguniform|randint(A,B)")
  return Param(parse_axis(body), when)


def check_space(base: ConfigDict, params: Sequence[Param]) -> None:
  """Refuses a space that cannot make configs: a key swept twice, a range on a key whose value
  is not a number, a condition on a key that is not swept or on a value it never takes."""
  keys = [p.key for p in params]
  if len(set(keys)) != len(keys):
    raise ConfigError(f"a key is swept twice: {', '.join(keys)}")
  by_key = {p.key: p for p in params}
  for p in params:
    if p.axis.distribution:
      current = _lookup(base, p.key)
      if isinstance(current, bool) or not isinstance(current, (int, float)):
        raise ConfigError(f"--sweep {p.key}={p.axis.distribution}(...): {p.key} is "
                          f"{current!r} in the experiment, not a number; list its values instead")
    if p.when:
      other = by_key.get(p.when[0])
      if other is None or other.axis.distribution or p.when[1] not in other.axis.values:
        raise ConfigError(f"--sweep {p.key}: its condition {p.when[0]}={p.when[1]!r} is not one "
                          f"of the listed values of a swept key")


def suggest(trial, params: Sequence[Param]) -> dict[str, Any]:
  """The trial's point, key -> value (as an override takes it), in the order of ``params``; a
  conditional key whose condition does not hold is left out."""
  point: dict[str, Any] = {}
  for p in params:
    if p.when and point.get(p.when[0], _MISSING) != p.when[1]:
      continue
    point[p.key] = _suggest_one(trial, p.axis)
  return point


def _suggest_one(trial, axis: Axis) -> Any:
  if axis.distribution == "randint":
    return trial.suggest_int(axis.key, int(axis.low), int(axis.high))
  if axis.distribution:
    return trial.suggest_float(axis.key, axis.low, axis.high,
                               log=axis.distribution == "loguniform")
  return _value(trial.suggest_categorical(axis.key, [_category(v) for v in axis.values]))


def grid(params: Sequence[Param]) -> dict[str, list]:
  """The search space of Optuna's ``GridSampler``: every key's categories."""
  ranged = [p.key for p in params if p.axis.distribution]
  if ranged:
    raise ConfigError(f"{', '.join(ranged)}: a range needs a sampler (--search random, tpe, ...)")
  if any(p.when for p in params):
    raise ConfigError("--search grid cannot hold conditional keys; use --search tpe or random")
  return {p.key: [_category(v) for v in p.axis.values] for p in params}


def signature(params: Sequence[Param]) -> str:
  """The space as text a study records, to refuse a worker started with another one."""
  return json.dumps([[p.key, p.axis.distribution, p.axis.low, p.axis.high,
                      [repr(v) for v in p.axis.values], repr(p.when)] for p in params])


_MISSING = object()


def _category(value: Any) -> Any:
  return value if isinstance(value, _PLAIN) else repr(value)


def _value(category: Any) -> Any:
  """A category back to the value it stands for (text made by ``_category`` is parsed)."""
  if isinstance(category, str):
    parsed = config_lib.parse_value(category)
    if not isinstance(parsed, _PLAIN):
      return parsed
  return category


def _lookup(config: ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    if part not in node:
      raise ConfigError(f"--sweep {dotted}: no such key in the experiment's config")
    node = node[part]
  return node
