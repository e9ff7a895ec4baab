"""Files written whole or not at all: a temporary file beside the target, then one rename.

A reader (a resumed run, a second process, a user) never sees half a file, and a crash while
writing leaves the previous file as it was. Works for local paths and for etils/epath URLs (an
object store's rename)."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

from etils import epath


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[epath.Path]:
  """A temporary path beside ``path`` to write to (same suffix, so numpy adds none); when the
  block ends it replaces ``path`` in one step, and if the block raises it is removed."""
  path = epath.Path(path)
  tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}{path.suffix}")
  try:
    yield tmp
    tmp.replace(path)  # os.replace: atomic, and overwrites (rename refuses an existing file)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
  """Writes ``data`` (text or bytes) to ``path`` through ``atomic_path``."""
  with atomic_path(path) as tmp:
    if isinstance(data, str):
      tmp.write_text(data)
    else:
      tmp.write_bytes(data)
