"""``deepflow sample``: draws from a trained generative model (text from a language model, image
grids from a GAN) and writes the draws under ``WORKDIR/samples/``.

What a draw is belongs to the task (``Task.sample`` and ``Task.save_samples``); this module only
restores the run's latest checkpoint, as ``deepflow eval`` does, and hands the task its
parameters, a key and the user's options.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import jax
import numpy as np

from deepflow import config as config_lib
from deepflow.train import checkpoint as checkpoint_lib
from deepflow.train.loop import Experiment

SAMPLES_DIR = "samples"


def sample_run(workdir: str, num: int = 4, *, seed: int = 0, overrides: Iterable[str] = (),
               debug: bool = False, **options: Any
               ) -> tuple[dict[str, np.ndarray], list[str], int]:
  """(samples, files written, checkpoint step) for the run in ``workdir``.

  ``options`` go to the task's ``sample`` as given (None values dropped, so each task keeps its
  own defaults). The draws are a function of ``seed`` and the checkpoint, nothing else."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} is not a deepflow run (no config.json)")
  with open(path) as f:
    config = config_lib.config_from_json(f.read(), overrides)
  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
  try:
    if checkpointer.latest_step() is None:
      raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}; train the run first")
    exp = Experiment(config, workdir, debug=debug)
    state, _, step = exp.restore(checkpointer)
  finally:
    checkpointer.close()
  options = {k: v for k, v in options.items() if v is not None}
  samples = exp.task.sample(state.params, state.model_state, jax.random.PRNGKey(seed), num,
                            **options)
  files = exp.task.save_samples(samples, os.path.join(workdir, SAMPLES_DIR))
  return samples, files, step
