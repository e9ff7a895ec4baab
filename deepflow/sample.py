"""``deepflow sample``: draws from a trained generative model (text from a language model, image
grids from a GAN) and writes the draws under ``WORKDIR/samples/``.

What a draw is belongs to the task (``Task.sample`` and ``Task.save_samples``); this module only
reopens the run with ``Experiment.from_workdir``, as every command reading a run does, and hands
the task its parameters, a key and the user's options.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import jax
import numpy as np

from deepflow.train.experiment import Experiment

SAMPLES_DIR = "samples"


def sample_run(workdir: str, num: int = 4, *, seed: int = 0, overrides: Iterable[str] = (),
               checkpoint: str | int = "best", debug: bool = False, **options: Any
               ) -> tuple[dict[str, np.ndarray], list[str], int]:
  """(samples, files written, checkpoint step) for the run in ``workdir``.

  ``options`` go to the task's ``sample`` as given (None values dropped, so each task keeps its
  own defaults). The draws are a function of ``seed`` and the checkpoint ('best', 'latest' or a
  step: ``Experiment.from_workdir``), nothing else."""
  exp, state, step, _ = Experiment.from_workdir(workdir, overrides, checkpoint=checkpoint,
                                                debug=debug)
  options = {k: v for k, v in options.items() if v is not None}
  samples = exp.task.sample(state.params, state.model_state, jax.random.PRNGKey(seed), num,
                            **options)
  files = exp.task.save_samples(samples, os.path.join(workdir, SAMPLES_DIR))
  return samples, files, step
