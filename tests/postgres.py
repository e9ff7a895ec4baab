"""A real PostgreSQL server for tests: ``initdb`` in a temporary directory, ``pg_ctl start`` on a
free local port, stopped and removed afterwards. Debian's ``postgresql`` package provides the
binaries (``.ci/run`` installs it); initdb refuses to run as root, so under root the server runs
as the ``postgres`` user."""
import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile

from helpers import free_port


def binaries() -> str | None:
  """The directory of initdb and pg_ctl, or None when PostgreSQL is not installed."""
  found = shutil.which("initdb") or next(iter(sorted(glob.glob(
      "/usr/lib/postgresql/*/bin/initdb"), reverse=True)), None)
  return os.path.dirname(found) if found else None


@contextlib.contextmanager
def server():
  """Yields the URL of a fresh server's ``postgres`` database (user ``deepflow``, trust auth)."""
  bindir = binaries()
  root = tempfile.mkdtemp(prefix="deepflow-pg-")
  as_user: list[str] = []
  if os.geteuid() == 0:
    owner = pwd.getpwnam("postgres")
    os.chown(root, owner.pw_uid, owner.pw_gid)
    as_user = ["runuser", "-u", "postgres", "--"]
  data, port = os.path.join(root, "data"), free_port()
  def run(*args):
    subprocess.run([*as_user, *args], check=True, capture_output=True, timeout=60)
  try:
    run(f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "deepflow", "--no-sync")
    run(f"{bindir}/pg_ctl", "-D", data, "-w", "-l", os.path.join(root, "log"), "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
        f"-c max_connections=50", "start")
    yield f"postgresql://deepflow@127.0.0.1:{port}/postgres"
  finally:
    if os.path.exists(os.path.join(data, "postmaster.pid")):
      run(f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
    shutil.rmtree(root, ignore_errors=True)
