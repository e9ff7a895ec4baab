"""Learning-rate schedules by name, each with an optional linear warmup from 0.

``decay_steps`` (0 = the whole run) counts the steps after warmup."""
from __future__ import annotations

from typing import Any, Callable

import optax

from deepflow.registry import SCHEDULES


@SCHEDULES.register("constant")
def constant(c, steps):
  return optax.constant_schedule(c.learning_rate)


@SCHEDULES.register("cosine")
def cosine(c, steps):
  """Cosine decay from learning_rate to end_learning_rate over ``steps``."""
  return optax.cosine_decay_schedule(c.learning_rate, max(steps, 1),
                                     alpha=c.end_learning_rate / c.learning_rate)


@SCHEDULES.register("linear")
def linear(c, steps):
  return optax.linear_schedule(c.learning_rate, c.end_learning_rate, max(steps, 1))


@SCHEDULES.register("exponential")
def exponential(c, steps):
  """learning_rate * decay_rate ** (step / steps), continuous."""
  return optax.exponential_decay(c.learning_rate, max(steps, 1), c.decay_rate)


@SCHEDULES.register("piecewise")
def piecewise(c, steps):
  """Step decay: multiply by decay_rate at each step in ``boundaries``."""
  return optax.piecewise_constant_schedule(c.learning_rate,
                                           {int(b): c.decay_rate for b in c.boundaries})


def build_schedule(c: Any, total_steps: int) -> Callable[[int], float]:
  """The schedule ``optimizer.schedule`` names, after ``warmup_steps`` of linear warmup."""
  decay_steps = c.decay_steps or max(total_steps - c.warmup_steps, 1)
  schedule = SCHEDULES.get(c.schedule)(c, decay_steps)
  if not c.warmup_steps:
    return schedule
  warmup = optax.linear_schedule(0.0, c.learning_rate, c.warmup_steps)
  return optax.join_schedules([warmup, schedule], [c.warmup_steps])
