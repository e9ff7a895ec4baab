"""One run per workdir: a run holds an exclusive lock on ``WORKDIR/run.lock`` while it trains.

The lock is an ``flock`` on that file, taken by process 0 (all processes of a multi-host job are
one run). The kernel drops an flock when its holder exits however it exits — SIGKILL and
crashes included — so a dead run never blocks the next one and no stale-lock timeout is
needed. The file itself stays behind; it records who held it last (host, pid, since when), which
is what a refused second run reports.

Object stores (``gs://``, ``s3://``) have no file locks: a workdir there is not locked, and two
runs started on it would both write. The job scheduler (one job per workdir) is the guard there.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
from typing import Iterator

import jax

from deepflow.train.errors import WorkdirLockedError
from deepflow.train.writers import is_remote

log = logging.getLogger("deepflow")
LOCK_FILE = "run.lock"


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds the workdir's lock for the duration of the block; raises ``WorkdirLockedError`` at
  once if another live process holds it."""
  if is_remote(workdir) or jax.process_index() != 0:
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  # Opened without truncating: the holder's record must survive a refused attempt.
  fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirLockedError(f"workdir {workdir} is in use by another run "
                               f"({_describe(_read(fd))}); wait for it to finish, stop it, "
                               f"or use another --workdir") from None
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode() + b"\n", 0)
    yield
  finally:
    os.close(fd)  # releases the flock


def _read(fd: int) -> dict:
  try:
    return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
  except ValueError:  # the holder is between truncating and writing its record
    return {}


def _describe(record: dict) -> str:
  if not record:
    return "holder unknown"
  return f"pid {record.get('pid')} on {record.get('host')} since {record.get('since')}"
