"""Devices and data placement: the mesh, shardings, multi-host start-up, global batches.

One mechanism: ``jax.jit`` over arrays with a ``NamedSharding`` on a ``Mesh``. With every device
on the ``data`` axis, parameters replicated and the batch split along it, XLA inserts the gradient
all-reduce itself: the same program as classic ``pmap`` data parallelism.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deepflow.registry import ConfigError

DATA = "data"
MODEL = "model"


def mesh_shape(mesh_config: Any, num_devices: int | None = None) -> dict[str, int]:
  """Axis sizes from ``mesh.shape`` ({'data': -1, 'model': 1}): one -1 takes what is left."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  shape = dict(mesh_config.shape)
  unknown = set(shape) - {DATA, MODEL}
  if unknown:
    raise ConfigError(f"unknown mesh axes {sorted(unknown)}; known: {DATA}, {MODEL}")
  fixed = math.prod(v for v in shape.values() if v != -1)
  free = [k for k, v in shape.items() if v == -1]
  if len(free) > 1 or any(v == 0 or v < -1 for v in shape.values()):
    raise ConfigError(f"mesh.shape {shape}: sizes must be positive, with at most one -1")
  if free:
    if num_devices % fixed:
      raise ConfigError(f"mesh.shape {shape} does not divide the {num_devices} devices")
    shape[free[0]] = num_devices // fixed
  if math.prod(shape.values()) != num_devices:
    raise ConfigError(f"mesh.shape {shape} needs {math.prod(shape.values())} devices, "
                      f"but {num_devices} are present")
  return shape


def data_axis_size(mesh_config: Any, num_devices: int | None = None) -> int:
  return mesh_shape(mesh_config, num_devices)[DATA]


def make_mesh(mesh_config: Any, devices: Sequence[Any] | None = None) -> Mesh:
  """A ``Mesh`` over ``devices`` (default: all devices of all hosts) with the configured axis
  sizes. ``deepflow plan`` passes the devices of a TPU topology it compiles for."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  return Mesh(np.asarray(devices).reshape(shape[DATA], shape[MODEL]), (DATA, MODEL))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis, the rest replicated."""
  return NamedSharding(mesh, P(DATA))


def state_shardings(abstract_state: Any, mesh: Mesh, parallel_config: Any) -> Any:
  """A ``NamedSharding`` for every leaf of the train state (params and optimizer state alike,
  so Adam's moments live where their parameters do):

  1. the first ``parallel.rules`` entry whose regex matches the leaf's path gives its spec;
  2. with ``strategy='fsdp'``, arrays of at least ``fsdp_min_size`` elements are split along
     their largest dimension divisible by the data axis (ZeRO-3 style: XLA gathers them for
     the forward pass and reduce-scatters the gradients);
  3. with a ``model`` axis larger than 1, matrices' last (output) dimension is split over it
     when divisible (tensor parallelism for dense and conv kernels);
  everything else is replicated. The program is correct for any choice: XLA inserts the
  collectives the shardings imply; only speed and memory change. A rule whose regex matches no
  leaf is a ConfigError."""
  from deepflow.pytree import Selector, flatten, path_name
  rules = [(Selector(pattern, "parallel.rules"), P(*spec))
           for pattern, spec in parallel_config.rules]
  names = list(flatten(abstract_state))
  for selector, _ in rules:
    selector.check(names, "variable")
  data, model = mesh.shape[DATA], mesh.shape[MODEL]

  def spec_for(path, leaf) -> P:
    name = path_name(path)
    for selector, spec in rules:
      if selector(name):
        return spec
    axes: list[Any] = [None] * len(leaf.shape)
    if model > 1 and len(leaf.shape) >= 2 and leaf.shape[-1] % model == 0:
      axes[-1] = MODEL
    if parallel_config.strategy == "fsdp" and math.prod(leaf.shape) >= parallel_config.fsdp_min_size:
      free = [d for d in range(len(leaf.shape)) if axes[d] is None and leaf.shape[d] % data == 0]
      if free:
        axes[max(free, key=lambda d: leaf.shape[d])] = DATA
    return P(*axes)

  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, spec_for(path, leaf)), abstract_state)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> Mapping[str, Any]:
  """Host-local numpy batch -> global arrays sharded over the data axis.

  On several hosts each contributes its rows and the global batch is their concatenation in
  process order. On one host the numpy arrays are returned as they are: the jitted step's
  ``in_shardings`` place them on the devices in its C++ fast path, which costs a fraction of a
  separate ``device_put`` per step."""
  if jax.process_count() == 1:
    return local
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins a multi-host run. With no arguments JAX detects the cluster (Cloud TPU, SLURM, ...)."""
  kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address,
                                  num_processes=num_processes,
                                  process_id=process_id).items() if v is not None}
  jax.distributed.initialize(**kwargs)


def to_host(tree: Any) -> Any:
  """Device arrays -> numpy, gathering the pieces other hosts hold when there are several."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def window_to_host(window: list[Any]) -> list[Any]:
  """A list of same-structured trees of device arrays (a log window's per-step metrics) on the
  host, as a list of trees of numpy values: stacked on the devices first by one jitted call, so
  each leaf crosses once for the whole window instead of once per step (one transfer per step
  and metric costs about as much as a small model's step). Compiles once per window length;
  the trees must share one structure."""
  if not window:
    return []
  stacked = to_host(_stack(window))
  return [jax.tree.map(lambda leaf: leaf[i], stacked) for i in range(len(window))]


@jax.jit
def _stack(trees: list[Any]) -> Any:
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


class DispatchWindow:
  """Keeps at most ``size`` dispatched steps in flight: adding the output of step k blocks until
  step k - size has finished.

  JAX dispatches asynchronously, so a loop that never reads a result runs ahead of the devices.
  On XLA's CPU client each device admits a bounded number of in-flight computations (a
  per-device semaphore); a host that runs more than that many multi-device steps ahead can
  block one device's launch while the other devices wait for it in a collective: a deadlock
  until XLA's collective timeout aborts the process (measured: 2 simulated devices wedge with
  48 steps in flight, never with 24). A couple of steps in flight is all the overlap of host
  work with device work needs, on every backend."""

  def __init__(self, size: int = 2):
    self.size = size
    self._in_flight: list[Any] = []

  def add(self, outputs: Any) -> None:
    self._in_flight.append(outputs)
    if len(self._in_flight) > self.size:
      jax.block_until_ready(self._in_flight.pop(0))
