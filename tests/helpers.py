"""Small shared builders for tests: tiny configs that train in a second, and `deepflow` in a
subprocess as a user runs it."""
import importlib.util
import os
import signal
import socket
import subprocess
import sys

from deepflow import config as config_lib

# The tiny experiment every test builds on: a digits-shaped synthetic classification that trains
# in a second. Keys are config paths; ``tiny_config`` (in process) and ``TINY_EXPERIMENT`` (an
# experiment file, for `deepflow --config`) both start from it.
TINY = {
    "model": dict(name="mlp", hidden=(32,)),
    "data.source": "synthetic:digits_like",
    "data.batch_size": 32,
    "data.eval_batch_size": 64,
    "train.steps": 8,
    "train.log_every": 4,
    "train.eval_every": 0,
    "train.checkpoint_every": 0,
    "train.progress": False,
}


def experiment_text(settings: dict) -> str:
  """An experiment file whose ``get_config`` is ``base_config()`` with ``settings`` set."""
  lines = "".join(f"  c.{key} = {value!r}\n" for key, value in settings.items())
  return f"from deepflow.config import base_config\n\ndef get_config():\n  c = base_config()\n" \
         f"{lines}  return c\n"


# The CLI tests' run: evaluated and checkpointed twice, with its progress bar (as a user sees it).
TINY_EXPERIMENT = experiment_text({
    **TINY, "model": dict(name="mlp", hidden=(16,)), "train.steps": 6, "train.log_every": 3,
    "train.eval_every": 3, "train.checkpoint_every": 3, "train.progress": True})


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


# Installed by ``no_network``: every connection attempt is written to $NETWORK_ATTEMPTS, then
# refused, so a test sees whether a command tried the network (a download, its retries) at all.
NO_NETWORK = """
import os, socket

def _refuse(*args, **kwargs):
  with open(os.environ["NETWORK_ATTEMPTS"], "a") as f:
    f.write(repr(args[-1] if args else kwargs) + "\\n")
  raise OSError("network access refused by the test")

socket.socket.connect = socket.socket.connect_ex = socket.create_connection = _refuse
socket.getaddrinfo = _refuse
"""


def no_network(tmp_path) -> tuple[dict, str]:
  """(an ``env`` for ``deepflow_cli`` under which the process cannot reach the network, the file
  that lists its attempts: absent if it made none). The refusal is a ``sitecustomize`` module,
  which Python imports at startup from PYTHONPATH."""
  site = tmp_path / "no_network"
  site.mkdir()
  (site / "sitecustomize.py").write_text(NO_NETWORK)
  attempts = str(tmp_path / "network_attempts")
  path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
  return {"PYTHONPATH": path, "NETWORK_ATTEMPTS": attempts}, attempts


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


def tiny_config(*overrides: str, model: dict | None = None, num_devices: int | None = None,
                **settings):
  """The tiny experiment's config (``TINY``), validated like a real one: ``settings`` (config
  paths with '__' for '.', e.g. ``train__steps=20``) and ``model`` replace its values, then
  ``overrides`` ('key=value' as on the command line) apply."""
  c = config_lib.base_config()
  values = {**TINY, **({"model": model} if model else {}),
            **{k.replace("__", "."): v for k, v in settings.items()}}
  for key, value in values.items():
    section, _, field = key.rpartition(".")
    (c[section] if section else c)[field] = value
  return config_lib.finalize(c, overrides, num_devices)


def update_of(task, total_steps: int | None = None):
  """What an experiment assembles around ``task`` from the task's config (``train.update``), its
  optimizer's schedule ``total_steps`` long (default ``train.steps``)."""
  from deepflow.train.update import build_update
  return build_update(task.config, task, total_steps or task.config.train.steps)


def grads_of(task):
  """The train step's gradient function of ``task`` (``train.step.gradient_fn``): ``(params,
  model_state, batch, rng) -> (grads, model_state, metrics)``."""
  from deepflow.train.step import gradient_fn
  return gradient_fn(update_of(task))


def reference_accuracy(workdir: str) -> float:
  """The eval-split accuracy of the run in ``workdir`` recomputed outside deepflow's evaluation
  (eval step, summarize): the restored model's argmax on every real example, against its label.
  The reference for runs too short, or on data too random, to be above chance."""
  import numpy as np
  from deepflow.data.pipeline import INPUTS, MASK, TARGETS
  from deepflow.train.experiment import Experiment
  exp, state, _, _ = Experiment.from_workdir(workdir)
  hits = []
  for batch in exp.pipeline.eval_batches(exp.config.data.eval_split):
    logits, _ = exp.task.apply(exp.model_params(state.params), state.model_state, batch[INPUTS],
                               None, train=False)
    real = np.asarray(batch[MASK]) > 0
    hits.append((np.argmax(np.asarray(logits), -1) == np.asarray(batch[TARGETS]))[real])
  return float(np.mean(np.concatenate(hits)))


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
