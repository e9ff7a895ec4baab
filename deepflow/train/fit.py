"""A run that will not fit says so before it starts.

``compile_checked(exp)`` compiles the run's train and eval steps from abstract shapes, as
``deepflow plan`` does (``deepflow.plan``), and compares each one's peak memory per device
(XLA's ``memory_analysis``: arguments + outputs - donated + temporaries) with what a device
has: a GPU's or TPU's allocator limit (``memory_stats()['bytes_limit']``), or on the CPU the
host's available memory (``MemAvailable``) shared by its CPU devices. A step that does not fit
is one ``DoesNotFit`` error naming the need, the memory, the largest global batch that fits
(found by compiling, as ``plan`` finds it, starting where memory linear in the batch would
reach the limit) and the options that lower the memory per example. Steps that fit are kept:
the run calls these executables, so checking compiles nothing twice.
"""
from __future__ import annotations

import logging
import os

import jax

from deepflow import plan as plan_lib
from deepflow.registry import ConfigError

GiB = plan_lib.GiB
log = logging.getLogger("deepflow")


class DoesNotFit(ConfigError):
  """The compiled steps need more memory per device than the devices have."""


def host_available_bytes() -> int:
  """Memory the host can still give a process without swapping (Linux's ``MemAvailable``; the
  free pages elsewhere)."""
  try:
    with open("/proc/meminfo") as f:
      line = next(line for line in f if line.startswith("MemAvailable:"))
    return int(line.split()[1]) * 1024
  except (OSError, StopIteration):
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_memory(device) -> tuple[float | None, str]:
  """(bytes one device can hold, the device as the error names it); None where unknown."""
  stats = device.memory_stats() or {}
  if stats.get("bytes_limit"):
    return stats["bytes_limit"], device.device_kind
  if device.platform != "cpu":
    return None, device.device_kind
  count = len([d for d in jax.local_devices() if d.platform == "cpu"])
  available = host_available_bytes()
  if count == 1:
    return available, "the CPU (the host's available memory)"
  return available / count, (f"each of the {count} CPU devices (sharing the host's "
                             f"{available / GiB:.2f} GiB available)")


def compile_checked(exp) -> None:
  """Compiles ``exp``'s train and eval steps for its batches, raises ``DoesNotFit`` if either
  needs more memory per device than there is, else makes them the steps ``exp`` calls."""
  config = exp.config
  state = plan_lib.abstract_args(exp)
  platform = exp.mesh.devices.flat[0].platform
  options = plan_lib.oom_options(platform)
  # The rows a train batch really has: data.batch_size, or a Poisson sampler's padded size.
  rows = exp.pipeline.batch_size * exp.pipeline.process_count
  train = exp.train_step.lower(state, exp.pipeline.abstract_batch(rows, train=True)).compile(
      options)
  evaluation = exp._eval_step.lower(state, exp.pipeline.abstract_batch(
      config.data.eval_batch_size, train=False)).compile(options)
  limit, device = device_memory(next(d for d in exp.mesh.devices.flat
                                     if d.process_index == jax.process_index()))
  costs = {"train": plan_lib.step_cost(train), "eval": plan_lib.step_cost(evaluation)}
  too_large = [name for name, cost in costs.items() if limit is not None and cost.peak > limit]
  if too_large:
    raise DoesNotFit(_message(exp, too_large[0], costs, limit, device, options, rows))
  exp.train_step, exp._eval_step = train, evaluation


def _message(exp, step: str, costs, limit: float, device: str, options, rows: int) -> str:
  config = exp.config
  need = (f"{config.model.name} at global batch {config.data.batch_size} does not fit: the "
          f"{step} step needs "
          f"{costs[step].peak / GiB:.2f} GiB per device, {device} has {limit / GiB:.2f} GiB")
  if step == "eval":
    return f"{need}; lower --config.data.eval_batch_size (now {config.data.eval_batch_size})"
  log.info("%s; finding the largest global batch that fits (a compile per try)", need)
  largest = _largest_batch(exp, rows, costs["train"].peak, limit, options)
  batch = (f"the largest global batch that fits is {largest} "
           f"(--config.data.batch_size={largest})" if largest else
           "not even the smallest global batch fits")
  changes = _options(config)
  saving = f"; or save memory per example: {', '.join(changes)}" if changes else ""
  return f"{need}; {batch}{saving} (`deepflow plan` shows where the memory goes)"


def _largest_batch(exp, rows: int, rows_peak: int, limit: float, options) -> int:
  """The largest global batch whose train step fits in ``limit`` bytes per device, searched as
  ``plan`` searches (a compile per try), from where memory linear in the batch would reach
  ``limit``; ``rows_peak`` is the peak already compiled for ``rows`` rows."""
  state = plan_lib.abstract_args(exp)
  peaks = {rows: rows_peak}

  def peak(batch_size: int) -> int:
    if batch_size not in peaks:
      batch = exp.pipeline.abstract_batch(batch_size, train=True)
      peaks[batch_size] = plan_lib.compile_cost(exp.train_step, state, batch,
                                                compiler_options=options).peak
    return peaks[batch_size]
  guess = _linear_guess(peak, rows, plan_lib.batch_unit(exp), limit)
  return plan_lib.largest_batch(exp, lambda b: peak(b) <= limit, guess)[0]


def _linear_guess(peak, rows: int, unit: int, limit: float) -> int:
  """Where the search starts: the batch at which memory, taken as linear in the batch from its
  peaks at ``unit`` and ``rows`` rows, reaches ``limit`` (the search then confirms it)."""
  if rows <= unit:
    return unit
  per_row = (peak(rows) - peak(unit)) / (rows - unit)
  return unit if per_row <= 0 else int(unit + (limit - peak(unit)) / per_row)


def _options(config) -> list[str]:
  """The memory-saving changes ``deepflow plan`` suggests that this config does not make yet."""
  from deepflow.models import model_options
  from deepflow.registry import MODELS
  model = {**model_options(MODELS.get(config.model.name)), **config.model}
  suggested = []
  if model.get("remat_policy") not in (None, "full", "nothing_saveable"):
    suggested.append("--config.model.remat_policy=full")
  if model.get("remat") is False:
    suggested.append("--config.model.remat=True")
  if config.data.batch_size % (2 * config.train.microbatches) == 0:
    suggested.append(f"--config.train.microbatches={2 * config.train.microbatches}")
  if config.parallel.strategy != "fsdp" and jax.device_count() > 1:
    suggested.append("--config.parallel.strategy=fsdp")
  if config.train.compute_dtype == "float32":
    suggested.append("--config.train.compute_dtype=bfloat16")
  return suggested
