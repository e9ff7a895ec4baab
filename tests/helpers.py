"""Small shared builders for tests: tiny configs that train in a second, and `deepflow` in a
subprocess as a user runs it."""
import importlib.util
import os
import signal
import socket
import subprocess
import sys

from deepflow import config as config_lib

TINY_EXPERIMENT = """
from deepflow.config import base_config

def get_config():
  c = base_config()
  c.model = dict(name="mlp", hidden=(16,))
  c.data.source = "synthetic:digits_like"
  c.data.batch_size = 32
  c.data.eval_batch_size = 64
  c.train.steps = 6
  c.train.log_every = 3
  c.train.eval_every = 3
  c.train.checkpoint_every = 3
  return c
"""


def write_experiment(path, text: str = TINY_EXPERIMENT) -> str:
  path.write_text(text)
  return str(path)


# A `deepflow` subprocess gets 2 simulated devices, not conftest's 8: two run the same
# data-parallel program (sharded batch, all-reduced gradients) at a third less CPU per step on
# the 2-core machine the suite runs on. A test that needs another count passes XLA_FLAGS in env.
CLI_DEVICES = 2


def subprocess_environment(env=None, devices: int = CLI_DEVICES) -> dict:
  """This process's environment with ``devices`` simulated devices, updated with ``env``."""
  flags = os.environ["XLA_FLAGS"].replace("device_count=8", f"device_count={devices}")
  return {**os.environ, "XLA_FLAGS": flags, **(env or {})}


def deepflow_cli(*args, env=None, timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
  """Runs ``python -m deepflow ARGS`` to completion and captures its output. A run that overruns
  ``timeout`` gets SIGABRT, which (PYTHONFAULTHANDLER, set by conftest) makes it print every
  thread's Python stack; the test then fails with that stack instead of hanging."""
  command = [sys.executable, "-m", "deepflow", *args]
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=subprocess_environment(env), **kwargs)
  try:
    stdout, stderr = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.send_signal(signal.SIGABRT)
    _, stderr = process.communicate()
    raise AssertionError(f"`deepflow {' '.join(args)}` ran over {timeout:.0f} s; its threads:\n"
                         f"{stderr[-8000:]}") from None
  return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def free_port() -> int:
  """A TCP port free on this machine now (a multi-process test's coordinator listens on it)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def one_line_error(out: subprocess.CompletedProcess) -> str:
  """The one ``deepflow: error:`` line of a failed command, asserting there is exactly one and
  no traceback."""
  assert out.returncode != 0
  assert "Traceback" not in out.stderr, out.stderr
  lines = [line for line in out.stderr.splitlines() if line.startswith("deepflow: error:")]
  assert len(lines) == 1, out.stderr
  return lines[0]


def deepflow_process(*args, env=None) -> subprocess.Popen:
  """Starts ``python -m deepflow ARGS`` in the background (for kill/preemption tests)."""
  return subprocess.Popen([sys.executable, "-m", "deepflow", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          env=subprocess_environment(env))


def tiny_config(*overrides: str, model: dict | None = None, num_devices: int | None = None):
  """A digits-shaped synthetic classification config, validated like a real one."""
  c = config_lib.base_config()
  c.model = model or dict(name="mlp", hidden=(32,))
  c.data.source = "synthetic:digits_like"
  c.data.batch_size = 32
  c.data.eval_batch_size = 64
  c.train.steps = 8
  c.train.log_every = 4
  c.train.eval_every = 0
  c.train.checkpoint_every = 0
  c.train.progress = False
  return config_lib.finalize(c, overrides, num_devices)


EXPERIMENTS = os.path.join(os.path.dirname(__file__), os.pardir, "experiments")


def experiment(name: str):
  """(path, module) of ``experiments/NAME.py``, imported (for its get_config and main)."""
  path = os.path.join(EXPERIMENTS, f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"experiment_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return path, module


def tiny(data_dir, steps: int = 3) -> list[str]:
  """Overrides that make any experiment run ``steps`` steps quietly on the session's data dir."""
  return [f"train.steps={steps}", "train.log_every=1", "train.progress=False",
          f"data.data_dir='{data_dir}'"]


def next_token_losses(model, tokens, learning_rate: float, steps: int = 60) -> list[float]:
  """Training losses of ``model`` (a language model's Linen module) fitted by Adam to predict
  ``tokens[:, 1:]`` from ``tokens[:, :-1]``, one fixed batch: a check that it can learn at all."""
  import jax
  import optax
  params = model.init(jax.random.PRNGKey(0), tokens[:, :-1])["params"]
  tx = optax.adam(learning_rate)

  def loss_fn(p):
    logits = model.apply({"params": p}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  @jax.jit
  def step(p, opt):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, loss

  opt, losses = tx.init(params), []
  for _ in range(steps):
    params, opt, loss = step(params, opt)
    losses.append(float(loss))
  return losses
