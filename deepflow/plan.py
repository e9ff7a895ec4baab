"""``deepflow plan``: what a run will need, from compiling its steps, before any hardware is rented.

The train and eval steps are the ones ``train`` jits (``Experiment``: same task, optimizer, mesh
rules and ``compile_steps``), lowered from abstract shapes (``jax.eval_shape`` of the state, one
preprocessed example for the batch) and compiled for the target devices: the local ones, or a
TPU slice described by ``jax.experimental.topologies`` (needs libtpu, the ``deepflow[tpu]``
extra; no TPU is needed). XLA's ``memory_analysis`` gives each device's argument, output,
aliased (donated) and temporary bytes, ``cost_analysis`` its FLOPs and bytes accessed.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import logging
import math
import os
from typing import Any, Callable

import jax
import numpy as np

from deepflow import parallel
from deepflow.registry import ConfigError

log = logging.getLogger("deepflow")
GiB = 2 ** 30
SEARCH_LIMIT = 64


@dataclasses.dataclass(frozen=True)
class Chip:
  """One JAX device of a TPU generation: HBM bytes, peak dense bf16 FLOP/s, HBM bytes/s."""
  name: str
  hbm: float
  peak_flops: float
  bandwidth: float


# Keyed by ``device.device_kind``; per JAX device, from Google's published per-chip figures.
CHIPS = {
    # v4: 32 GiB HBM2, 1200 GB/s, 275 TFLOP/s bf16 per chip of 2 TensorCores; a topology
    # description lists each TensorCore as a device, so half of each.
    # https://cloud.google.com/tpu/docs/v4
    "TPU v4": Chip("TPU v4 (one TensorCore)", 16 * GiB, 137.5e12, 600e9),
    # v5e: 16 GiB HBM2, 819 GB/s, 197 TFLOP/s bf16 per chip. https://cloud.google.com/tpu/docs/v5e
    "TPU v5 lite": Chip("TPU v5e", 16 * GiB, 197e12, 819e9),
    # v5p: 95 GiB HBM2e, 2765 GB/s, 459 TFLOP/s bf16 per chip. https://cloud.google.com/tpu/docs/v5p
    "TPU v5": Chip("TPU v5p", 95 * GiB, 459e12, 2765e9),
    # v6e (Trillium): 32 GiB HBM, 1640 GB/s, 918 TFLOP/s bf16 per chip.
    # https://cloud.google.com/tpu/docs/v6e
    "TPU v6 lite": Chip("TPU v6e", 32 * GiB, 918e12, 1640e9),
}


def _libtpu_quiet() -> None:
  """libtpu looks for a TPU VM's worker and accelerator variables and prints a warning per
  missing one; a topology compile on any machine needs neither, so they get harmless values."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # A plan compiles only: several may run at once (parallel tests), which the lock would refuse.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")


def target_devices(topology: str | None) -> list[Any]:
  """The local devices, or the devices of a TPU topology such as ``v5e:2x2``."""
  if not topology:
    return jax.devices()
  if importlib.util.find_spec("libtpu") is None:
    raise ConfigError("plan --topology needs libtpu: pip install 'deepflow[tpu]'")
  _libtpu_quiet()
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
  except Exception as e:  # libtpu's message for a name it does not know is several lines
    raise ConfigError(f"unknown TPU topology {topology!r} (e.g. v5e:2x2, v4:2x2x1, v5p:2x2x1, "
                      f"v6e:4x4): {str(e).splitlines()[0]}") from e


def device_limits(device) -> tuple[float | None, Chip | None]:
  """(HBM bytes, chip figures) of a device: the TPU table, else what the runtime reports."""
  chip = CHIPS.get(device.device_kind)
  if chip:
    return chip.hbm, chip
  stats = device.memory_stats() if device.platform != "tpu" else None
  return (stats or {}).get("bytes_limit"), None


@dataclasses.dataclass(frozen=True)
class StepCost:
  """Per-device figures of one compiled step."""
  arguments: int
  outputs: int
  aliased: int   # outputs written into donated arguments
  temporaries: int
  flops: float
  bytes_accessed: float

  @property
  def peak(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries


def compile_cost(jitted, *abstract_args, compiler_options=None) -> StepCost:
  return step_cost(jitted.lower(*abstract_args).compile(compiler_options))


def step_cost(compiled) -> StepCost:
  """The figures of a compiled step (``jax.stages.Compiled``)."""
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older JAX: one dict per program
  return StepCost(memory.argument_size_in_bytes, memory.output_size_in_bytes,
                  memory.alias_size_in_bytes, memory.temp_size_in_bytes,
                  float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)))


def _shard_bytes(leaf, sharding) -> int:
  return math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize


def state_bytes(abstract_state, shardings) -> dict[str, int]:
  """Per-device bytes of the parameters, optimizer state and model state (batch statistics)."""
  def total(part):
    return sum(_shard_bytes(leaf, s) for leaf, s in zip(
        jax.tree.leaves(getattr(abstract_state, part)), jax.tree.leaves(getattr(shardings, part))))
  return {part: total(part) for part in ("params", "opt_state", "model_state")}


def sharding_table(abstract_state, shardings) -> list[dict[str, Any]]:
  """Every parameter: its path, global shape, PartitionSpec and bytes per device."""
  from deepflow.pytree import path_name
  leaves = jax.tree_util.tree_leaves_with_path(abstract_state.params)
  return [{"name": path_name(path), "shape": list(leaf.shape),
           "spec": str(tuple(sharding.spec)), "bytes": _shard_bytes(leaf, sharding)}
          for (path, leaf), sharding in zip(leaves, jax.tree.leaves(shardings.params))]


def largest_fitting(fits: Callable[[int], bool], unit: int, limit: int,
                    guess: int | None = None) -> int:
  """The largest multiple of ``unit`` up to ``limit`` for which ``fits`` holds (0 if none),
  assuming that memory grows with the batch: from ``guess`` (default ``unit``: plain doubling),
  steps of doubling size up while it fits, or down while it does not, then bisection. A good
  guess (memory is close to linear in the batch) needs two or three tries, each a compile."""
  top = limit // unit
  start = min(max(1, (guess or unit) // unit), top)
  if fits(start * unit):
    good, step = start, 1
    while good + step <= top and fits((good + step) * unit):
      good, step = good + step, step * 2
    bad = min(good + step, top + 1)
  else:
    bad, step = start, 1
    while bad - step >= 1 and not fits((bad - step) * unit):
      bad, step = bad - step, step * 2
    good = max(bad - step, 0)
  while bad - good > 1:
    middle = (good + bad) // 2
    good, bad = (middle, bad) if fits(middle * unit) else (good, middle)
  return good * unit


def batch_unit(exp) -> int:
  """The step between global batches ``exp``'s run can take: its data-parallel width times its
  micro-batches."""
  return dict(exp.mesh.shape)[parallel.DATA] * exp.config.train.microbatches


def largest_batch(exp, fits: Callable[[int], bool], guess: int | None = None
                  ) -> tuple[int, bool]:
  """The largest global batch of ``exp``'s run (a multiple of ``batch_unit``) for which
  ``fits`` holds, searched from ``guess``, and whether that is the search's limit."""
  config = exp.config
  unit = batch_unit(exp)
  # The search stops at SEARCH_LIMIT times the configured batch: a tiny model would fit
  # millions of rows, and each try is a compile.
  limit = max(unit, SEARCH_LIMIT * config.data.batch_size // unit * unit)
  largest = largest_fitting(fits, unit, limit, guess)
  return largest, largest == limit


def oom_options(platform: str) -> dict | None:
  """XLA options under which a program larger than the device still compiles, to be measured:
  the TPU compiler refuses one otherwise; told not to, it reports its sizes."""
  return {"xla_tpu_no_crash_on_oom": True} if platform == "tpu" else None


def abstract_args(exp):
  """The train state as shapes, dtypes and shardings: what the steps are lowered with."""
  return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                      exp.abstract_state, exp.shardings)


def _unrolled(config):
  """The config without loops over layers (``model.scan_layers``) or micro-batches, or None if
  it has none. XLA's cost analysis counts a loop's body once, so the FLOPs and bytes of a
  looped step are read from this equivalent (the same arithmetic, unrolled) program."""
  scanned = bool(config.model.get("scan_layers", False))
  if not scanned and config.train.microbatches == 1:
    return None
  config = copy.deepcopy(config)
  if scanned:
    config.model.scan_layers = False
  config.train.microbatches = 1
  return config


# The policies ``plan --remat_policies`` compares: nothing recomputed, everything recomputed,
# and the two jax.checkpoint_policies in between that models at scale use most.
REMAT_COMPARED = ("none", "full", "dots_saveable", "nothing_saveable")


def remat_table(exp, compiler_options=None) -> list[dict[str, Any]]:
  """The train step of ``exp`` compiled once per remat policy (``model.remat_policy``): per-device
  temporaries (activations kept for the backward pass and scratch) and peak bytes of each.

  A policy changes only what the backward pass recomputes, not the variables, data, optimizer or
  shardings, so each policy's step is ``exp``'s with its task rebuilt: one experiment for all."""
  config = exp.config
  if "remat_policy" not in config.model:
    raise ConfigError(f"model {config.model.name!r} has no remat_policy to compare")
  state_args = abstract_args(exp)
  batch = exp.pipeline.abstract_batch(config.data.batch_size, train=True)
  rows = []
  for policy in REMAT_COMPARED:
    try:
      cost = compile_cost(_train_step_with(exp, policy), state_args, batch,
                          compiler_options=compiler_options)
    except jax.errors.JaxRuntimeError as e:  # e.g. the TPU compiler refusing a program far
      rows.append({"policy": policy, "temporaries": None, "peak": None,  # larger than HBM
                   "error": str(e).splitlines()[0]})
      continue
    rows.append({"policy": policy, "temporaries": cost.temporaries, "peak": cost.peak})
  return rows


def _train_step_with(exp, remat_policy: str):
  """``exp``'s jitted train step (its XLA options too) with the model under ``remat_policy``."""
  from deepflow.train.experiment import build_task
  if remat_policy == exp.config.model.remat_policy:
    return exp.train_step
  config = copy.deepcopy(exp.config)
  config.model.remat_policy = remat_policy
  return exp.compiled_train_step(exp.compiler_options,
                                 build_task(config, exp.pipeline.spec))


def format_remat(rows: list[dict[str, Any]], current: str | None) -> list[str]:
  """``remat_table``'s rows as lines: each policy's temporaries and peak per device, and what
  it saves against 'none'."""
  base = next(r for r in rows if r["policy"] == "none")["peak"]
  lines = ["train step per remat policy (model.remat_policy)   temporaries          peak"]
  for r in rows:
    name = f"  {r['policy'] + (' (this config)' if r['policy'] == current else ''):<48}"
    if r["peak"] is None:
      lines.append(f"{name}does not compile: {r['error']}")
    else:
      saves = "" if base is None else f"  saves {_gib(base - r['peak'])}"
      lines.append(f"{name}{_gib(r['temporaries']):>13}{_gib(r['peak']):>14}{saves}")
  return lines


def make_plan(config, topology: str | None = None, *, search_batch: bool = True,
              remat_policies: bool = False) -> dict[str, Any]:
  """Compiles the config's train and eval steps for the target devices; returns the plan
  (with ``remat_policies``, also the train step's memory under each ``REMAT_COMPARED``)."""
  from deepflow.train.experiment import Experiment
  devices = target_devices(topology)
  exp = Experiment(config, None, devices=devices)
  hbm, chip = device_limits(devices[0])
  mesh_axes = dict(exp.mesh.shape)
  state_args = abstract_args(exp)

  options = oom_options(devices[0].platform)

  def train_cost(batch_size: int) -> StepCost:
    return compile_cost(exp.train_step, state_args,
                        exp.pipeline.abstract_batch(batch_size, train=True),
                        compiler_options=options)

  train = train_cost(config.data.batch_size)
  unrolled = _unrolled(config)
  if unrolled is not None:
    loopless = Experiment(unrolled, None, devices=devices)
    counted = compile_cost(loopless.train_step, abstract_args(loopless),
                           loopless.pipeline.abstract_batch(config.data.batch_size, train=True),
                           compiler_options=options)
    train = dataclasses.replace(train, flops=counted.flops, bytes_accessed=counted.bytes_accessed)
  evaluation = compile_cost(exp._eval_step, state_args,
                            exp.pipeline.abstract_batch(config.data.eval_batch_size, train=False),
                            compiler_options=options)
  peak = max(train.peak, evaluation.peak)
  plan: dict[str, Any] = {
      "config": {"model": config.model.name, "task": config.task.name,
                 "batch_size": config.data.batch_size, "strategy": config.parallel.strategy,
                 "compute_dtype": config.train.compute_dtype},
      "remat_policy": config.model.get("remat_policy"),
      "devices": {"count": len(devices), "kind": devices[0].device_kind,
                  "platform": devices[0].platform, "topology": topology, "mesh": mesh_axes,
                  "hbm_bytes": hbm, "peak_flops": chip.peak_flops if chip else None,
                  "hbm_bandwidth": chip.bandwidth if chip else None},
      "parameters": sum(math.prod(x.shape) for x in jax.tree.leaves(exp.abstract_state.params)),
      "state_bytes": state_bytes(exp.abstract_state, exp.shardings),
      "train_step": dataclasses.asdict(train) | {"peak": train.peak},
      "eval_step": dataclasses.asdict(evaluation) | {"peak": evaluation.peak},
      "peak_bytes": peak,
      "costs_from": "the compiled step" if unrolled is None else
                    "its unrolled equivalent (XLA counts a loop body once)",
      "sharding": sharding_table(exp.abstract_state, exp.shardings),
  }
  if chip:
    compute, memory = train.flops / chip.peak_flops, train.bytes_accessed / chip.bandwidth
    plan["roofline"] = {"step_seconds": max(compute, memory), "compute_seconds": compute,
                        "memory_seconds": memory,
                        "mfu_bound": compute / max(compute, memory) if compute else 0.0}
  plan["fits"] = None if hbm is None else peak <= hbm
  plan["free_bytes"] = None if hbm is None else hbm - peak
  if search_batch and hbm is not None:
    plan["largest_batch"], plan["largest_batch_is_limit"] = largest_batch(
        exp, lambda b: train_cost(b).peak <= hbm)
  if remat_policies:
    plan["remat"] = remat_table(exp, options)
  return plan


def _rss() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_high_water() -> int:
  with open("/proc/self/status") as f:
    line = next(line for line in f if line.startswith("VmHWM:"))
  return int(line.split()[1]) * 1024


def measure(config, steps: int) -> dict[str, Any]:
  """Runs ``steps`` real train steps on the local devices; their peak memory per device.

  A GPU reports its allocator's ``peak_bytes_in_use``. The CPU has no device allocator, so the
  process's resident-memory high-water mark is reset (Linux ``clear_refs``) after compiling and
  fetching the batches, and what the state, batches and steps add to it, per local device, is
  the measurement."""
  from deepflow.train.experiment import Experiment
  from deepflow.train.state import create_state
  import functools
  exp = Experiment(config, None)
  iterator = exp.pipeline.train_iterator()
  batches = [next(iterator) for _ in range(steps)]
  init = jax.jit(functools.partial(create_state, exp.update, exp.tx, config.seed),
                 out_shardings=exp.shardings).lower().compile()
  state_args = abstract_args(exp)
  step = exp.train_step.lower(state_args, exp.pipeline.abstract_batch(
      config.data.batch_size, train=True)).compile()
  device = jax.devices()[0]
  on_device = bool(device.memory_stats())
  if not on_device:
    if not os.path.exists("/proc/self/clear_refs"):
      raise ConfigError("plan --measure on the CPU needs Linux's /proc memory counters")
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM to the current resident size
    before = _rss()
  state = init()
  for batch in batches:
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  if on_device:
    return {"peak_bytes": device.memory_stats()["peak_bytes_in_use"], "source": "device allocator"}
  count = len(jax.local_devices())  # simulated CPU devices share the process's memory
  return {"peak_bytes": (_rss_high_water() - before) / count,
          "source": f"process resident memory / {count} devices"}


def _gib(n: float | None) -> str:
  return "unknown" if n is None else f"{n / GiB:.3f} GiB"


def format_plan(plan: dict[str, Any]) -> str:
  """The plan as the text ``deepflow plan`` prints."""
  d, c, train = plan["devices"], plan["config"], plan["train_step"]
  where = f"topology {d['topology']}" if d["topology"] else "the local devices"
  lines = [f"plan for {c['model']} ({plan['parameters']:,} parameters, {c['task']}) on {where}: "
           f"{d['count']} x {d['kind']}, mesh {d['mesh']}, strategy {c['strategy']}, global "
           f"batch {c['batch_size']}, compute {c['compute_dtype']}", "",
           "per device                          train step       eval step"]
  sb, ev = plan["state_bytes"], plan["eval_step"]
  rows = [("parameters", sb["params"], sb["params"]), ("optimizer state", sb["opt_state"], None),
          ("model state (batch statistics)", sb["model_state"], sb["model_state"]),
          ("arguments (state + batch)", train["arguments"], ev["arguments"]),
          ("outputs", train["outputs"], ev["outputs"]),
          ("aliased (donated state)", train["aliased"], ev["aliased"]),
          ("activations / temporaries", train["temporaries"], ev["temporaries"]),
          ("peak", train["peak"], ev["peak"])]
  lines += [f"  {name:<32}{_gib(a):>14}{'' if b is None else _gib(b):>16}" for name, a, b in rows]
  lines.append(f"  {'memory of the device':<32}{_gib(d['hbm_bytes']):>14}")
  lines.append("")
  lines.append(f"FLOPs per train step, per device: {train['flops']:.4g}; bytes accessed: "
               f"{train['bytes_accessed']:.4g} (from {plan['costs_from']})")
  if "roofline" in plan:
    r = plan["roofline"]
    lines.append(f"roofline step time at peak ({d['peak_flops'] / 1e12:g} TFLOP/s, "
                 f"{d['hbm_bandwidth'] / 1e9:g} GB/s): {r['step_seconds'] * 1e3:.3f} ms "
                 f"(compute {r['compute_seconds'] * 1e3:.3f} ms, memory "
                 f"{r['memory_seconds'] * 1e3:.3f} ms): MFU at most {r['mfu_bound']:.0%}")
  lines += ["", "parameter sharding (bytes per device)"]
  width = max([len(p["name"]) for p in plan["sharding"]] + [10])
  spec_width = max(len(p["spec"]) for p in plan["sharding"])
  lines += [f"  {p['name']:<{width}}  {str(tuple(p['shape'])):<18} {p['spec']:<{spec_width}} "
            f"{p['bytes'] / 2 ** 20:10.3f} MiB" for p in plan["sharding"]]
  lines.append("")
  if plan["fits"] is None:
    lines.append(f"peak {_gib(plan['peak_bytes'])} per device; the device's memory is unknown")
  elif plan["fits"]:
    lines.append(f"fits, {_gib(plan['free_bytes'])} free per device")
  else:
    lines.append(f"does not fit by {_gib(-plan['free_bytes'])} per device")
  if "largest_batch" in plan:
    at_least = "at least " if plan["largest_batch_is_limit"] else ""
    lines.append(f"largest global batch that fits (by compiling): {at_least}"
                 f"{plan['largest_batch']}")
  if "remat" in plan:
    lines += ["", *format_remat(plan["remat"], plan.get("remat_policy"))]
  if "measured" in plan:
    m = plan["measured"]
    ratio = m["peak_bytes"] / train["peak"] - 1
    lines.append(f"measured peak over {m['steps']} steps ({m['source']}): "
                 f"{_gib(m['peak_bytes'])} vs predicted {_gib(train['peak'])} ({ratio:+.1%})")
  return "\n".join(lines)
