"""LoRA (Hu et al., 2021): low-rank adapters on a model's kernels, for any model.

With ``model.lora.rank`` = r > 0, every parameter whose '/'-joined path matches
``model.lora.targets`` (a regex; Dense and attention kernels end in ``kernel``) gets two
siblings, ``lora_a`` (shape (fan_in, r), Gaussian / sqrt(fan_in)) and ``lora_b`` ((r, fan_out),
zeros), and the model runs with ``kernel + (alpha / r) * lora_a @ lora_b`` in its place. The
update starts at zero, so the adapted model first computes what the loaded one did; the optimizer
trains only the adapters (``deepflow.optim.partition`` freezes the rest).

Adapters are a reparameterization of the parameter tree, not new layers: ``merge`` folds them
into the kernels before every ``apply``, so any model (and the tasks, export and sampling built
on it) takes them without change, and ``deepflow export`` writes the merged kernels.

A kernel of more than two axes (``DenseGeneral``: attention's qkv (d, 3, heads, head_dim) and
output (heads, head_dim, d) projections) is adapted as the matrix whose rows are its leading
axes and columns its trailing ones, split where that matrix is closest to square (ties: the
earlier split). For those two kernels that is exactly the projection's (inputs, outputs).
"""
from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from deepflow import pytree
from deepflow.registry import ConfigError, some_names

ADAPTERS = ("lora_a", "lora_b")
ADAPTER_PATTERN = re.compile(r"(^|/)lora_[ab]$")


class LoraConfig(NamedTuple):
  rank: int
  alpha: float
  targets: str

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def from_config(lora: Any) -> LoraConfig | None:
  """The ``model.lora`` section, checked; None when the rank is 0 (off)."""
  rank, alpha, targets = lora["rank"], lora["alpha"], lora["targets"]
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
    raise ConfigError(f"model.lora.rank must be an integer >= 0, got {rank!r}")
  if not rank:
    return None
  if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
    raise ConfigError(f"model.lora.alpha must be a number > 0, got {alpha!r}")
  pytree.Selector(targets, "model.lora.targets")  # check the regex now
  return LoraConfig(rank, float(alpha), targets)


def is_adapter(path: str) -> bool:
  """Whether the '/'-joined parameter path names an adapter."""
  return bool(ADAPTER_PATTERN.search(path))


def split_axis(shape: tuple[int, ...]) -> int:
  """Where a kernel's axes divide into rows and columns: the split whose matrix is closest to
  square (a 2-D kernel: 1)."""
  def imbalance(k: int) -> float:
    return abs(math.log(math.prod(shape[:k])) - math.log(math.prod(shape[k:])))
  return min(range(1, len(shape)), key=imbalance)


def add_adapters(params: Any, lora: LoraConfig, rng: jax.Array) -> Any:
  """``params`` with ``lora_a``/``lora_b`` beside every targeted kernel. A regex that matches
  no kernel of at least two axes is a ConfigError naming the parameters there are."""
  flat = pytree.flatten(params)
  kernels = [p for p, v in flat.items() if jnp.ndim(v) >= 2]
  selector = targets_selector(lora)
  selector.check(kernels, "kernel")
  targets = [p for p in kernels if selector(p)]
  parents = [p.rpartition("/")[0] for p in targets]
  shared = sorted(p for p in targets if parents.count(p.rpartition("/")[0]) > 1)
  if shared:  # adapters are named by their module: one adapted kernel per module
    raise ConfigError(f"model.lora.targets {lora.targets!r} matches several kernels of one "
                      f"module ({some_names(shared)}); narrow it to one per module")
  for i, path in enumerate(sorted(targets)):
    kernel = flat[path]
    k = split_axis(kernel.shape)
    rows, cols = math.prod(kernel.shape[:k]), math.prod(kernel.shape[k:])
    parent = path.rpartition("/")[0]
    key = jax.random.fold_in(rng, i)
    flat[_join(parent, "lora_a")] = (jax.random.normal(key, (rows, lora.rank), kernel.dtype)
                                     / math.sqrt(rows))
    flat[_join(parent, "lora_b")] = jnp.zeros((lora.rank, cols), kernel.dtype)
  return pytree.unflatten(flat)


def merge(params: Any, lora: LoraConfig) -> Any:
  """The parameter tree the model itself takes: each adapted kernel plus
  ``(alpha / rank) * lora_a @ lora_b`` (reshaped to the kernel), the adapters removed."""
  flat = pytree.flatten(params)
  selector = targets_selector(lora)
  merged = {}
  for path, value in flat.items():
    if is_adapter(path):
      continue
    parent = path.rpartition("/")[0]
    a = flat.get(_join(parent, "lora_a"))
    if a is not None and selector(path):
      delta = (a @ flat[_join(parent, "lora_b")]).reshape(value.shape)
      value = value + (lora.scale * delta).astype(value.dtype)
    merged[path] = value
  return pytree.unflatten(merged)


def targets_selector(lora: LoraConfig) -> pytree.Selector:
  return pytree.Selector(lora.targets, "model.lora.targets")


def _join(parent: str, name: str) -> str:
  return f"{parent}/{name}" if parent else name

