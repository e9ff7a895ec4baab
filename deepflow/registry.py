"""Name -> factory registries: how a config string becomes a model, dataset, optimizer, ...

A config says ``model.name = 'cnn'``; the builder calls ``MODELS.get('cnn')``. Adding a new
piece is one ``@MODELS.register('name')`` on its factory. An unknown name raises a
``ConfigError`` that lists the known names, so a typo is a one-line fix.

One registration rule: a registry is filled by one package, whose ``__init__.py`` imports every
module that registers into it, and code that looks a name up imports that package first:

  MODELS, ACTIVATIONS    deepflow.models
  TASKS                  deepflow.tasks
  SOURCE_KINDS, DATASETS, TRANSFORMS
                         deepflow.data (a ``data.source`` is ``KIND:REST``; the synthetic
                         datasets are in DATASETS; the bundled ones, TFDS builders, register in
                         ``deepflow.data.bundled.BUILDERS``, imported on first use so that
                         TFDS loads only then)
  OPTIMIZERS, SCHEDULES  deepflow.optim
  REGULARIZERS           deepflow.regularizers
"""
from __future__ import annotations

import difflib
import re
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
  """A user error in the experiment config: reported as one line, without a traceback."""


def first_line(error: BaseException) -> str:
  """The first line of an error's message (its type's name if it has none), at most 300
  characters: what a one-line report of a library's error quotes."""
  text = str(error).strip().splitlines()
  return (text[0] if text else type(error).__name__)[:300]


class Registry(Generic[T]):
  """A named mapping from strings to factories (classes or functions)."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator: ``@REGISTRY.register('name')`` stores the decorated object under ``name``."""
    def add(obj: T) -> T:
      if name in self._entries and self._entries[name] is not obj:
        raise ValueError(f"{self.kind} {name!r} is already registered")
      self._entries[name] = obj
      return obj
    return add

  def get(self, name: str) -> T:
    if name not in self._entries:
      hint = difflib.get_close_matches(str(name), self._entries, n=1)
      maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
      raise ConfigError(f"unknown {self.kind} {name!r}{maybe}; known: {', '.join(self.names())}")
    return self._entries[name]

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __getitem__(self, name: str) -> T:
    return self.get(name)

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())


MODELS: Registry = Registry("model")
TASKS: Registry = Registry("task")
SOURCE_KINDS: Registry = Registry("data source kind")
DATASETS: Registry = Registry("dataset")
TRANSFORMS: Registry = Registry("transform")
OPTIMIZERS: Registry = Registry("optimizer")
SCHEDULES: Registry = Registry("schedule")
ACTIVATIONS: Registry = Registry("activation")
REGULARIZERS: Registry = Registry("regularizer")


def some_names(names: list[str], limit: int = 8) -> str:
  """The first ``limit`` of ``names`` for a one-line error, with how many there are in all."""
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") or "none"


def is_number(value: object) -> bool:
  """An int or float as a config value (a bool is not one, though Python counts it as an int)."""
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_non_negative(owner: str, **values: object) -> None:
  """A one-line ConfigError for an option of ``owner`` (e.g. "transform 'flip'") that is not a
  number >= 0."""
  for key, value in values.items():
    if not is_number(value) or value < 0:
      raise ConfigError(f"{owner}: {key} must be a number >= 0, got {value!r}")


def compile_regex(pattern: str, key: str) -> re.Pattern:
  """A config value that must be a regex (``key`` names it in the one-line error)."""
  try:
    return re.compile(pattern)
  except (re.error, TypeError) as e:
    raise ConfigError(f"{key} {pattern!r} is not a regex: {e}") from e
