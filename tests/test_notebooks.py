"""Every notebook in notebooks/ runs headless, offline, with a few training steps, and is kept
with its outputs cleared (so reviews show code, and the repository stays small)."""
import glob
import json
import os
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from tests.helpers import subprocess_environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
STEPS = "12"  # DEEPFLOW_NOTEBOOK_STEPS: enough for every curve to have a few points


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_outputs_are_cleared(path):
  nb = nbformat.read(path, as_version=4)
  dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and
           (cell.get("outputs") or cell.get("execution_count") is not None)]
  assert not dirty, (f"{os.path.basename(path)}: cells {dirty} keep outputs; clear them "
                     f"(jupyter nbconvert --clear-output --inplace {path})")


def kernel_manager(tmp_path) -> KernelManager:
  """A kernel on this very interpreter, whatever kernelspecs the machine has installed: a fresh
  CI venv and a developer's laptop then run the notebooks against the same deepflow."""
  spec_dir = tmp_path / "kernels" / "deepflow-test"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "deepflow tests", "language": "python"}))
  specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
  return KernelManager(kernel_name="deepflow-test", kernel_spec_manager=specs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, data_dir, monkeypatch):
  # A notebook that shows an extra (ONNX, Optuna) names its modules in metadata.deepflow.requires
  # and runs where the extra is installed (CI installs them all).
  for module in nbformat.read(path, as_version=4).metadata.get("deepflow", {}).get("requires", []):
    pytest.importorskip(module, reason=f"{os.path.basename(path)} needs {module} (an extra)")
  # The kernel inherits this environment: few steps, the session's prepared datasets, and the
  # simulated devices of a `deepflow` subprocess. It runs in tmp_path, so its runs/ land there.
  monkeypatch.setenv("DEEPFLOW_NOTEBOOK_STEPS", STEPS)
  monkeypatch.setenv("XLA_FLAGS", subprocess_environment()["XLA_FLAGS"])
  monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
  km = kernel_manager(tmp_path)
  try:
    execute(path, km, tmp_path)
  finally:
    assert not km.is_alive(), "the notebook's kernel outlived its test"


def execute(path: str, km: KernelManager, cwd) -> None:
  """Runs every cell of ``path`` on a kernel started from ``km``, then shuts the kernel down,
  whether the cells passed or not: nbclient leaves alone a kernel manager it was handed."""
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(nb, km=km, timeout=240, resources={"metadata": {"path": str(cwd)}})
  try:
    client.execute()  # raises CellExecutionError, naming the cell, when one fails
  finally:
    if km.has_kernel:
      km.shutdown_kernel(now=True)


def test_a_failing_notebook_shuts_its_kernel_down(tmp_path):
  failing = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise SystemError('x')")])
  path = str(tmp_path / "failing.ipynb")
  nbformat.write(failing, path)
  km = kernel_manager(tmp_path)
  with pytest.raises(Exception, match="SystemError"):
    execute(path, km, tmp_path)
  assert not km.is_alive()
