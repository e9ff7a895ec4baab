"""XLA compiler options for a run's train and eval steps: deepflow's defaults per platform,
``train.xla_options`` over them, and their choice by measurement on CPU (``train.autotune``).

The options are set per compiled program (``jax.jit(..., compiler_options=...)``), so they reach
deepflow's steps and nothing else in the process, unlike ``XLA_FLAGS``.

CPU: XLA:CPU runs convolutions in YNNPACK unless told otherwise, or in Eigen. Measured on a
2-core x86_64 CPU (``benchmarks/vs_pytorch.py``, README), Eigen's train steps were 1.4-1.6x
faster on a quiet machine (digits CNN at batch 128 and 1024, ResNet-20: YNNPACK's kernel
gradients of 32x32 and 16x16 images ran at ~12 GFLOP/s) and level with YNNPACK's under load
(0.99-1.25x), so deepflow's CPU default (``PLATFORM_DEFAULTS``) puts convolutions in Eigen.
Where another machine or model favours YNNPACK, ``train.autotune`` finds out: it compiles the
train step once per candidate of ``CPU_CANDIDATES``, times each on copies of the run's first
state and batch (the run's own state is untouched, so tuning does not change what is trained),
keeps the fastest and records it in ``workdir/autotune.json``.

Every later reader of the run applies that record (``apply_record``): the candidates' kernels
sum in different orders, so the same choice is what keeps a resumed run bit-identical to an
uninterrupted one. GPU and TPU compilers autotune their own kernels; there ``train.autotune``
only logs that it has nothing to do.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from deepflow.atomic import write_atomic
from deepflow.registry import ConfigError
from deepflow.train.protocols import Compiling

log = logging.getLogger("deepflow")

RECORD = "autotune.json"
YNN_FUSIONS = "xla_cpu_experimental_ynn_fusion_type"
# XLA:CPU's YNNPACK fusion list (jaxlib 0.10's default) with and without INDIVIDUAL_CONVOLUTION.
# A per-program option replaces the whole list (the '-name' form of XLA_FLAGS is not accepted
# here), so both are spelled out; tests/train/test_tuning.py checks them against XLA's default.
CPU_CANDIDATES: dict[str, dict[str, Any]] = {
    "ynnpack_convolutions": {YNN_FUSIONS: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
                                          "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,"
                                          "LIBRARY_FUSION_TYPE_REDUCE"},
    "eigen_convolutions": {YNN_FUSIONS: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
                                        "LIBRARY_FUSION_TYPE_REDUCE"},
}
PLATFORM_DEFAULTS: dict[str, dict[str, Any]] = {"cpu": CPU_CANDIDATES["eigen_convolutions"]}
ROUND_SECONDS = 0.2  # each candidate's timed round runs at least this long
ROUNDS = 3  # interleaved, so a noisy neighbour slows every candidate alike; the median counts

Step = Callable[[Any, Any], tuple[Any, Any]]


def check_options(options: Mapping[str, Any], platform: str | None = None) -> dict[str, Any]:
  """``options`` as a plain dict, each name and value checked by compiling a trivial program
  with them: an unknown name or a bad value is a one-line ``ConfigError``. Options for another
  platform than this process's default backend (``deepflow plan --topology`` of a TPU slice on
  a CPU host) are left to that platform's compiler, which names a bad one just as clearly."""
  options = dict(options)
  for name, value in options.items():
    if not isinstance(value, (str, bool, int, float)):
      raise ConfigError(f"train.xla_options[{name!r}] must be a string, bool or number, got "
                        f"{type(value).__name__}")
  if options and (platform is None or platform == jax.default_backend()):
    try:
      jax.jit(lambda: jnp.zeros(()), compiler_options=options).lower().compile()
    except Exception as e:  # XLA's own message names the option and what is wrong with it
      message = str(e).strip().splitlines()[0]
      raise ConfigError(f"train.xla_options: {message}") from e
  return options


def step_options(xla_options: Mapping[str, Any], platform: str) -> dict[str, Any]:
  """The options a run's steps compile with on ``platform``: deepflow's defaults there, with
  ``train.xla_options`` (checked) over them."""
  return {**PLATFORM_DEFAULTS.get(platform, {}), **check_options(xla_options, platform)}


def apply_record(exp: Compiling) -> dict | None:
  """Compiles ``exp``'s steps with the options ``autotune`` recorded in its workdir (over the
  config's own ``train.xla_options``), if it recorded any for this platform; returns the
  record. Every reader of a tuned run calls this: the loop (so a resumed or finished run runs
  the programs it was trained with) and ``Experiment.from_workdir``."""
  record = recorded(exp.workdir)
  if record:
    exp.use_compiler_options({**exp.base_options, **record["options"]})
  return record


def autotune(exp: Compiling, state: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
  """Sets ``exp``'s steps to the fastest candidate's options (see the module docstring) and
  returns them; ``state`` and ``batch`` are the run's first, only read. A run that has a record
  was set up from it by ``apply_record`` and is not timed again."""
  base = dict(exp.compiler_options)
  platform = jax.default_backend()
  record = recorded(exp.workdir)
  if record:
    log.info("autotune: %s, as recorded in %s", record["choice"], _path(exp.workdir))
    return base
  if jax.config.jax_disable_jit:
    log.info("autotune: nothing to tune in debug mode (the steps run eagerly)")
    return base
  if platform != "cpu":
    log.info("autotune: nothing to tune on %s (its compiler tunes its own kernels)", platform)
    return base
  began = time.perf_counter()
  steps = {name: exp.compiled_train_step({**base, **options})
           for name, options in CPU_CANDIDATES.items()}
  copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=exp.shardings)
  seconds = measure(steps, lambda: copy(state), batch)
  names = list(CPU_CANDIDATES)
  choice = names[int(_agreed(np.argmin([seconds[n] for n in names])))]
  log.info("autotune: %s (%s; tuning took %.1f s)", choice, ", ".join(
      f"{name} {seconds[name] * 1e3:.1f} ms/step" for name in names),
      time.perf_counter() - began)
  if jax.process_index() == 0:  # written whole or not at all: a torn record stops a resume
    write_atomic(_path(exp.workdir), json.dumps({
        "platform": platform, "choice": choice, "options": CPU_CANDIDATES[choice],
        "ms_per_step": {name: round(seconds[name] * 1e3, 3) for name in names}}, indent=2))
  return exp.use_compiler_options({**base, **CPU_CANDIDATES[choice]}, steps[choice])


def recorded(workdir: str | None) -> dict | None:
  """The choice ``autotune`` recorded in ``workdir`` for this platform, if any (its
  ``options`` are the candidate's own, applied over ``train.xla_options``)."""
  path = _path(workdir) if workdir else None
  if path is None or not path.exists():
    return None
  try:
    record = json.loads(path.read_text())
    options, platform, _ = dict(record["options"]), record["platform"], record["choice"]
    check_options(options, platform)
  except (ValueError, KeyError, TypeError, ConfigError) as e:
    raise ConfigError(f"{path} is not a usable autotune record ({type(e).__name__}: {e}); "
                      f"delete it to tune again") from e
  return record if platform == jax.default_backend() else None


def measure(steps: Mapping[str, Step], fresh_state: Callable[[], Any], batch,
            rounds: int = ROUNDS, round_seconds: float = ROUND_SECONDS) -> dict[str, float]:
  """Median seconds per call of each step over ``rounds`` interleaved rounds, each starting
  from ``fresh_state()`` (the steps may donate it) and long enough to last ``round_seconds``.
  Every process makes the same calls (process 0's counts): the steps' collectives pair up."""
  calls = []
  for step in steps.values():  # compiles, then sizes the rounds by one timed call
    jax.block_until_ready(step(fresh_state(), batch))
    state = fresh_state()
    jax.block_until_ready(state)
    start = time.perf_counter()
    jax.block_until_ready(step(state, batch))
    calls.append(max(1, int(round_seconds / max(time.perf_counter() - start, 1e-6))))
  calls = dict(zip(steps, _agreed(np.asarray(calls, np.int32)).tolist()))
  samples: dict[str, list[float]] = {name: [] for name in steps}
  for _ in range(rounds):
    for name, step in steps.items():
      state = fresh_state()
      jax.block_until_ready(state)
      start = time.perf_counter()
      for _ in range(calls[name]):
        state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      samples[name].append((time.perf_counter() - start) / calls[name])
  return {name: statistics.median(times) for name, times in samples.items()}


def _path(workdir: str) -> epath.Path:
  return epath.Path(workdir) / RECORD


def _agreed(value: np.ndarray) -> np.ndarray:
  """Process 0's ``value`` on every process: each times its own share of the devices, but all
  must run and compile the same programs for their collectives to match."""
  if jax.process_count() == 1:
    return np.asarray(value)
  return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))
