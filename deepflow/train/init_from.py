"""A run's first state from trained weights (``model.init_from``).

The source is one of:

  RUN, RUN:best, RUN:latest, RUN:STEP   a deepflow workdir, read through
                                        ``Experiment.from_workdir`` with the ``--checkpoint``
                                        rule (RUN alone is RUN:best: the run's result); a run
                                        trained with LoRA gives its merged kernels
  an Orbax checkpoint directory         a CheckpointManager's directory (its newest step), one
                                        step's directory, or a saved pytree (a TrainState's
                                        ``params`` and ``model_state`` are taken from it)
  FILE.safetensors, FILE.npz            named tensors (``deepflow export --format safetensors``
                                        writes them; ``model.init_layout='pytorch'`` reads a
                                        PyTorch state_dict)
  hf:DIR                                a Hugging Face checkpoint, which also gives the model
                                        section (``deepflow.hf.finetune``)

Tensors are fitted by name (``deepflow.weights.matching``: ``model.init_map``, ``model.init_skip``,
one-line errors). Parameters and batch statistics are loaded; the step, the optimizer state
(initialised from the loaded parameters) and the RNG are the new run's own. The loop calls this
only when the workdir has no checkpoint, so a resumed run continues from its own checkpoint and
never reloads the source.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from deepflow import parallel, pytree
from deepflow.models import lora as lora_lib
from deepflow.registry import ConfigError
from deepflow.train import CHECKPOINTS
from deepflow.train.experiment import Experiment
from deepflow.train.state import TrainState
from deepflow.weights import files, matching, pytorch

log = logging.getLogger("deepflow")


def initial_state(exp: Experiment) -> TrainState:
  """A fresh state for ``exp``, its variables taken from ``model.init_from`` when set.

  The source is fitted to the model's abstract variables (names, shapes, dtypes: nothing is
  initialised for that); each loaded tensor is placed with its variable's sharding and the
  state is built under jit from them (``Experiment.init_state``), so the variables the source
  does not give (``model.init_skip``, LoRA adapters) are initialised on the devices as in a
  fresh run, and every process of a multi-host run places only its own shards."""
  model = exp.config.model
  if not model.init_from:
    return exp.init_state()
  if model.init_from.startswith("hf:"):  # a Hugging Face checkpoint: deepflow.hf.finetune
    from deepflow.hf import finetune
    return exp.init_state(finetune.initial_variables(
        model, variables(exp.abstract_state), variables(exp.shardings),
        scanned=getattr(exp.task.model, "scan_layers", False), lora=exp.update.lora is not None))
  tensors = read_source(model.init_from)
  if model.init_layout == "pytorch":
    tensors = pytorch.from_state_dict(tensors)
  tensors = matching.rename(tensors, model.init_map)
  target = variables(exp.abstract_state)
  fresh = lora_lib.is_adapter if exp.update.lora else (lambda name: False)
  fitted = matching.fit(tensors, target, skip=model.init_skip, fresh=fresh,
                        source=f"model.init_from {model.init_from!r}")
  shardings = variables(exp.shardings)
  loaded = {k: _place(v, shardings[k]) for k, v in fitted.items()
            if v is not target[k]}  # fit passes the ones left fresh through
  log.info("initialised from %s: %d tensors loaded, %d left fresh", model.init_from,
           len(loaded), len(target) - len(loaded))
  return exp.init_state(loaded)


def variables(state: TrainState) -> dict[str, Any]:
  """A state's (or its shardings' or shapes') parameters and model state under flat names."""
  return pytree.flatten({"params": state.params, **state.model_state})


def _place(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """A host array as a global array with ``sharding``: each process puts only its own devices'
  pieces (``jax.device_put`` would first check across processes that every copy is the same)."""
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def read_source(spec: str) -> dict[str, np.ndarray]:
  """The named tensors of an ``init_from`` value (see the module docstring)."""
  path, which = split_checkpoint(spec)
  if path.endswith(files.FORMATS):
    return files.read(path)
  if (epath.Path(path) / "config.json").exists():
    try:
      restored = Experiment.from_workdir(path, checkpoint=which)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"model.init_from {spec!r}: {e}") from e
    params = restored.experiment.model_params(restored.state.params)
    return files.flatten(parallel.to_host({"params": params, **restored.state.model_state}))
  if which != "best" or path != spec:
    raise FileNotFoundError(f"model.init_from {spec!r}: {path} is not a deepflow run "
                            f"(no config.json), so it takes no :{which}")
  if not epath.Path(path).is_dir():
    raise FileNotFoundError(f"model.init_from {spec!r}: no such run, checkpoint directory or "
                            f"weights file ({', '.join(files.FORMATS)})")
  return _read_orbax(epath.Path(path).resolve())


def split_checkpoint(spec: str) -> tuple[str, str | int]:
  """'RUN:STEP' -> ('RUN', STEP); 'RUN:best' -> ('RUN', 'best'); anything else (including a
  URL's 'gs://') -> (spec, 'best')."""
  head, sep, tail = spec.rpartition(":")
  if sep and head and (tail in CHECKPOINTS or tail.isdigit()):
    return head, int(tail) if tail.isdigit() else tail
  return spec, "best"


def _read_orbax(path: epath.Path) -> dict[str, np.ndarray]:
  """The variables in an Orbax directory: a manager's (newest step), a step's or a pytree's.

  Read as host arrays: restored into device arrays, Orbax would need the devices (and
  processes) the checkpoint was saved from."""
  steps = sorted((int(p.name) for p in path.iterdir() if p.name.isdigit()), reverse=True)
  if steps:
    path = path / str(steps[0])
  if (path / "state").is_dir():
    path = path / "state"
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    saved = checkpointer.metadata(os.fspath(path)).item_metadata
    if saved is None:
      raise ValueError("no Orbax metadata (not a checkpoint)")
    on_host = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved.tree)
    tree = checkpointer.restore(os.fspath(path), args=ocp.args.PyTreeRestore(restore_args=on_host))
  except Exception as e:  # noqa: BLE001  Orbax raises many types for a directory it cannot read
    raise ConfigError(f"model.init_from: cannot read an Orbax checkpoint in {path}: "
                      f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
  if isinstance(tree, dict) and "params" in tree:  # a TrainState
    return files.flatten({"params": tree["params"], **(tree.get("model_state") or {})})
  return files.flatten({"params": tree})
