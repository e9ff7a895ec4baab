"""Checkpoints with Orbax: the TrainState and the data iterator's position, saved together.

Saves are asynchronous (training continues while the files are written) and atomic (Orbax
writes into a temporary directory and renames it), so a crash mid-save leaves the previous
checkpoint intact. A checkpoint whose shapes do not match the configured model is refused with
one line instead of being loaded into the wrong model.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from deepflow.registry import ConfigError


class CheckpointMismatchError(ConfigError):
  """The checkpoint on disk was written by a different model or optimizer."""


class Checkpointer:
  """Latest-``keep`` checkpoints of (state, data iterator state) under ``workdir/checkpoints``."""

  def __init__(self, workdir: str, keep: int = 3, *, read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                             read_only=read_only,
                                             enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict | None, *, force: bool = False) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict | None, int]:
    """(state, data iterator state, step) of ``step`` or the latest checkpoint."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    has_data = os.path.isdir(os.path.join(self.directory, str(step), "data"))
    if has_data:
      items["data"] = ocp.args.JsonRestore()
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointMismatchError(
          f"checkpoint {step} in {self.directory} does not match the configured model/optimizer "
          f"({_first_line(e)}); use a new --workdir or the config it was trained with") from e
    return restored["state"], (restored["data"] if has_data else None), step

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else type(error).__name__)[:300]


def abstract_like(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs with the target shardings: what Orbax restores into."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


logging.getLogger("absl").setLevel(logging.WARNING)
