"""Checkpoints with Orbax: the TrainState and the data iterator's position, saved together.

Saves are asynchronous (training continues while the files are written) and atomic (Orbax
writes into a temporary directory and renames it), so a crash mid-save leaves the previous
checkpoint intact. A checkpoint whose shapes do not match the configured model is refused with
one line instead of being loaded into the wrong model.
"""
from __future__ import annotations

import logging
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from deepflow.registry import ConfigError, first_line
from deepflow.train.writers import is_remote

log = logging.getLogger("deepflow")


class CheckpointMismatchError(ConfigError):
  """The checkpoint on disk was written by a different model or optimizer."""


class Checkpointer:
  """Latest-``keep`` checkpoints of (state, data iterator state) under ``workdir/checkpoints``.

  ``read_only=True`` (eval, export, notebooks) only restores: it creates no directory, deletes
  nothing and refuses ``save``."""

  def __init__(self, workdir: str, keep: int = 3, *, read_only: bool = False):
    self.directory = epath.Path(workdir) / "checkpoints"
    if not is_remote(workdir):
      self.directory = self.directory.resolve()
    self.read_only = read_only
    self.manager = ocp.CheckpointManager(self.directory, options=_manager_options(keep, read_only))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict | None, *, force: bool = False) -> None:
    if self.read_only:
      raise ValueError(f"cannot save step {step}: this Checkpointer of {self.directory} is "
                       f"read-only")
    items = {"state": ocp.args.StandardSave(state)}
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict | None, int]:
    """(state, data iterator state, step) of ``step``, or of the newest readable checkpoint.

    Without a ``step``, an unreadable checkpoint (truncated or corrupted files) is moved aside
    to ``corrupt-STEP`` with a warning and the next older one is tried, so a damaged save never
    blocks a resume nor gets silently loaded. If none can be restored, the newest one's error is
    raised: the usual cause is a config whose model or optimizer differs from the checkpoint's."""
    steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    errors = []
    for candidate in steps:
      try:
        state, data_state = self._restore(abstract_state, candidate)
      except Exception as e:  # noqa: BLE001  Orbax/TensorStore raise many types for bad files
        errors.append((candidate, e))
        continue
      for bad, error in errors:
        self._set_aside(bad, error, candidate)
      return state, data_state, candidate
    bad, error = errors[0]
    raise CheckpointMismatchError(
        f"checkpoint {bad} in {self.directory} cannot be restored into the configured "
        f"model/optimizer ({first_line(error)}); use a new --workdir or the config it was "
        f"trained with") from error

  def _restore(self, abstract_state: Any, step: int) -> tuple[Any, dict | None]:
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    has_data = (self.directory / str(step) / "data").exists()
    if has_data:
      items["data"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], (restored["data"] if has_data else None)

  def _set_aside(self, step: int, error: BaseException, used: int) -> None:
    log.warning("checkpoint %d is unreadable (%s); moved to corrupt-%d, resuming from step %d",
                step, first_line(error), step, used)
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(self.directory / f"corrupt-{step}")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _manager_options(keep: int, read_only: bool) -> ocp.CheckpointManagerOptions:
  """Async saves keeping the latest ``keep``; or, read-only, a manager that cannot write.

  Orbax's own ``read_only`` flag is not used: it logs a warning on every construction (and one
  per option it overrides) whatever the other options say. A manager that creates no directory
  (``create``), keeps every step (``max_to_keep=None``: it never deletes), cleans up no
  temporary directories and is never asked to save is just as read-only, and quiet."""
  if read_only:
    return ocp.CheckpointManagerOptions(max_to_keep=None, create=False,
                                        cleanup_tmp_directories=False,
                                        enable_async_checkpointing=False)
  return ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                      enable_async_checkpointing=True)


def abstract_like(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs with the target shardings: what Orbax restores into."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


