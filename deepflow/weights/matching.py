"""Fitting a source's named tensors to a configured model: rename, skip, then match by name.

``model.init_map`` ``[(regex, replacement), ...]`` rewrites each source name in order
(``re.sub``); ``model.init_skip`` (a regex) names the parameters left as freshly initialised, and
source tensors of those names are ignored (e.g. a classification head for another number of
classes). Every other model variable must receive exactly one source tensor of its shape, and
every source tensor must land on a variable: anything else is one ``WeightsMismatchError``
listing the missing, unexpected and wrongly shaped names — never a silent partial load.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import numpy as np

from deepflow.pytree import Selector
from deepflow.registry import ConfigError, compile_regex, some_names

SHOWN = 6  # names listed per kind of mismatch in the one-line error


class WeightsMismatchError(ConfigError):
  """The source's tensors do not fit the configured model."""


LAYOUTS = ("deepflow", "pytorch")  # model.init_layout: how the source names and lays out tensors


def check_config(model: Any) -> None:
  """The model section's transfer keys, checked with the rest of the config before anything is
  built: a known ``init_layout``, and ``init_map`` rules and an ``init_skip`` regex that compile.
  They may stay set while ``init_from`` is cleared (a from-scratch baseline of a fine-tuning
  recipe: ``model.init_from=``), and then act on nothing."""
  if model.init_layout not in LAYOUTS:
    raise ConfigError(f"model.init_layout must be one of {', '.join(LAYOUTS)}, got "
                      f"{model.init_layout!r}")
  rules(model.init_map)
  if model.init_skip:
    compile_regex(model.init_skip, "model.init_skip")


def rules(init_map: Iterable[Any]) -> list[tuple[re.Pattern, str]]:
  """``model.init_map`` as compiled (regex, replacement) pairs; a malformed entry or a regex
  that does not compile is a ``ConfigError``."""
  compiled = []
  for rule in init_map:
    if not (isinstance(rule, (list, tuple)) and len(rule) == 2
            and all(isinstance(r, str) for r in rule)):
      raise ConfigError(f"each model.init_map entry must be (regex, replacement), got {rule!r}")
    compiled.append((compile_regex(rule[0], "model.init_map"), rule[1]))
  return compiled


def rename(tensors: dict[str, np.ndarray], init_map: Iterable[Any]) -> dict[str, np.ndarray]:
  """The tensors under the names ``init_map``'s rules give them (applied in order)."""
  compiled = rules(init_map)
  out: dict[str, np.ndarray] = {}
  origin: dict[str, str] = {}
  for name, value in tensors.items():
    new = name
    for regex, replacement in compiled:
      new = regex.sub(replacement, new)
    if new in out:
      raise WeightsMismatchError(f"model.init_map maps both {origin[new]!r} and {name!r} to "
                                 f"{new!r}")
    out[new], origin[new] = value, name
  return out


def fit(tensors: dict[str, np.ndarray], target: dict[str, Any], *, skip: str = "",
        fresh: Callable[[str], bool] = lambda name: False, source: str = "the source"
        ) -> dict[str, np.ndarray]:
  """``target`` (flat names -> arrays or shape structs of the configured model) with every
  variable not skipped taken from ``tensors``, cast to the target's dtype. ``fresh`` marks
  variables that no source can hold (LoRA adapters); they keep the target's values too."""
  skipped = Selector(skip, "model.init_skip") if skip else None
  if skipped:
    skipped.check(target, "variable")
  keep = lambda name: bool(skipped and skipped(name)) or fresh(name)  # noqa: E731
  wanted = {k: v for k, v in target.items() if not keep(k)}
  given = {k: v for k, v in tensors.items() if not (skipped and skipped(k))}
  missing = sorted(set(wanted) - set(given))
  unexpected = sorted(set(given) - set(wanted))
  shapes = sorted(f"{k} {tuple(np.shape(given[k]))} vs {tuple(wanted[k].shape)}"
                  for k in set(wanted) & set(given)
                  if tuple(np.shape(given[k])) != tuple(wanted[k].shape))
  problems = [f"{label} {len(names)}: {some_names(names, SHOWN)}"
              for label, names in (("missing", missing), ("unexpected", unexpected),
                                   ("wrong shape (source vs model)", shapes)) if names]
  if problems:
    raise WeightsMismatchError(
        f"{source} does not fit the model: {'; '.join(problems)} (rename with model.init_map, "
        f"leave fresh with model.init_skip)")
  return {k: np.asarray(given[k]).astype(wanted[k].dtype, copy=False) if k in wanted else v
          for k, v in target.items()}

