"""deepflow's real train step on fixed device-resident batches, and a timed round of any step:
what the side-by-side benchmarks (vs_pytorch.py, dp_vs_opacus.py) time on deepflow's side."""
from __future__ import annotations

import time

import jax

from deepflow.train import init_from, tuning
from deepflow.train.experiment import Experiment


def deepflow_step(config, workdir: str, num_batches: int = 4):
  """(step, sync, host batches): ``step()`` runs ``Experiment.train_step`` once on the next of
  ``num_batches`` batches from the config's own pipeline, put on the device beforehand; it is
  compiled (run once) before it is returned. The first state is the loop's (from
  ``model.init_from`` when set). With ``train.autotune`` its XLA options are
  chosen first, as the loop chooses them."""
  exp = Experiment(config, workdir)
  iterator = exp.pipeline.train_iterator()
  host = [next(iterator) for _ in range(num_batches)]
  batches = [jax.device_put(b) for b in host]
  state = [init_from.initial_state(exp), 0]
  if config.train.autotune:  # as the loop does on its first batch (records in workdir)
    tuning.autotune(exp, state[0], batches[0])

  def step():
    state[0], metrics = exp.train_step(state[0], batches[state[1] % len(batches)])
    state[1] += 1
    return metrics
  jax.block_until_ready(step())
  return step, jax.block_until_ready, host


def time_round(step, sync, steps: int) -> float:
  """Seconds per step over ``steps`` calls, waiting for the last result."""
  start = time.perf_counter()
  for _ in range(steps):
    out = step()
  sync(out)
  return (time.perf_counter() - start) / steps
