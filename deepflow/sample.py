"""``deepflow sample``: draws from a trained generative model (text from a language model, image
grids from a GAN) and writes the draws under ``WORKDIR/samples/``.

What a draw is belongs to the task (``Task.sample``); this module reopens the run with
``Experiment.from_workdir``, as every command reading a run does, hands the task its parameters,
a key and the user's options, and writes what it drew (``save_samples``).
"""
from __future__ import annotations

import io
import os
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

from deepflow.train.experiment import RunSource

SAMPLES_DIR = "samples"
TEXT_FILE, GRID_FILE, ARRAYS_FILE = "samples.txt", "samples.png", "samples.npz"


def sample_run(run: RunSource | str, num: int = 4, *, seed: int = 0, **options: Any
               ) -> tuple[dict[str, np.ndarray], list[str], int]:
  """(samples, files written, checkpoint step) for ``run`` (a workdir or a ``RunSource``).

  ``options`` go to the task's ``sample`` as given (None values dropped, so each task keeps its
  own defaults). The draws are a function of ``seed`` and the checkpoint ('best', 'latest' or a
  step: ``Experiment.from_workdir``), nothing else."""
  source = RunSource.of(run)
  exp, state, step, _ = source.open()
  options = {k: v for k, v in options.items() if v is not None}
  samples = exp.task.sample(exp.model_params(state.params), state.model_state,
                            jax.random.PRNGKey(seed), num, **options)
  title = f"{num} samples of {exp.config.model.name} on {exp.config.data.source}"
  files = save_samples(samples, os.path.join(source.workdir, SAMPLES_DIR), title=title)
  return samples, files, step


def save_samples(samples: Mapping[str, np.ndarray], directory: str, *,
                 title: str | None = None) -> list[str]:
  """Writes a task's draws into ``directory``; returns the paths written. ``text`` (a language
  model's): ``samples.txt``, each under a ``--- sample N ---`` line. ``images`` (a GAN's):
  ``samples.png``, a grid (one row per class when there are ``labels``), and ``samples.npz``,
  the arrays as drawn."""
  epath.Path(directory).mkdir(parents=True, exist_ok=True)
  files = []
  if "text" in samples:
    path = os.path.join(directory, TEXT_FILE)
    epath.Path(path).write_text("".join(f"--- sample {i + 1} ---\n{text}\n"
                                        for i, text in enumerate(samples["text"])))
    files.append(path)
  if "images" in samples:
    from deepflow.analysis.plots import save_image_grid
    files.append(save_image_grid(os.path.join(directory, GRID_FILE), samples["images"],
                                 samples.get("labels"), title=title))
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in samples.items()})
    path = os.path.join(directory, ARRAYS_FILE)
    epath.Path(path).write_bytes(buffer.getvalue())
    files.append(path)
  return files
