"""Running a sweep: one sub-workdir per trial, trained one after another (resumable) or as one
vmapped population (``--vectorize``), then the results written."""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

from etils import epath
from ml_collections import ConfigDict

from deepflow.atomic import write_atomic
from deepflow.registry import ConfigError
from deepflow.sweep.population import train_population
from deepflow.sweep.results import RESULT, write_results
from deepflow.sweep.space import Axis, make_trials, overrides_of, trial_config

log = logging.getLogger("deepflow")

TRIAL = "trial.json"  # in each trial's directory: the overrides that made it


def run_sweep(base: str | ConfigDict, workdir: str, axes: Sequence[Axis], *,
              overrides: Sequence[str] = (), trials: int = 0, seed: int = 0,
              vectorize: bool = False, metric: str | None = None,
              mode: str | None = None) -> list[dict[str, Any]]:
  """Runs (or resumes) the sweep in ``workdir``; returns the rows of ``results.csv``, ranked.
  The sweep holds ``workdir``'s lock (and each trial its own), so two sweeps never share one."""
  from deepflow.train import workdir_lock
  os.makedirs(workdir, exist_ok=True)
  with workdir_lock.hold(workdir):
    return _run_sweep(base, workdir, axes, overrides=overrides, trials=trials, seed=seed,
                      vectorize=vectorize, metric=metric, mode=mode)


def _run_sweep(base, workdir, axes, *, overrides, trials, seed, vectorize, metric, mode):
  points = make_trials(axes, trials, seed)
  if not points:
    raise ConfigError("the sweep has no trials")
  configs = [trial_config(base, [*overrides, *overrides_of(p)]) for p in points]
  dirs = [os.path.join(workdir, f"trial_{i:03d}") for i in range(len(points))]
  for d, point in zip(dirs, points):
    _claim(d, point)
  pending = [i for i, d in enumerate(dirs) if not os.path.exists(os.path.join(d, RESULT))]
  if len(pending) < len(points):
    log.info("sweep: %d of %d trials already finished; skipping them", len(points) - len(pending),
             len(points))
  if vectorize and pending:
    _, results = train_population([configs[i] for i in pending], [dirs[i] for i in pending])
    for i, result in zip(pending, results):
      _write_json(os.path.join(dirs[i], RESULT), result)
  else:
    import deepflow
    from deepflow.train import NonFiniteLossError
    for i in pending:
      log.info("sweep: trial %d of %d: %s", i + 1, len(points), " ".join(overrides_of(points[i])))
      try:
        result = {"status": "ok", "metrics": deepflow.train_and_evaluate(configs[i], dirs[i])}
      except NonFiniteLossError as e:  # a diverging trial is a result, not the sweep's end
        result = {"status": f"failed: {str(e).splitlines()[0]}", "metrics": {}}
      _write_json(os.path.join(dirs[i], RESULT), result)
  return write_results(workdir, points, dirs, metric, mode)


def _claim(trial_dir: str, point: dict[str, Any]) -> None:
  """Records a trial's overrides in its directory, refusing one made for different ones."""
  path = epath.Path(trial_dir) / TRIAL
  record = {"overrides": overrides_of(point)}
  if path.exists():
    if json.loads(path.read_text()) != record:
      raise ConfigError(f"{trial_dir} belongs to a different sweep; use a new --workdir")
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  _write_json(str(path), record)


def _write_json(path: str, value: Any) -> None:
  """Written whole, then renamed over ``path`` (local or an object store's, e.g. ``gs://``)."""
  write_atomic(path, json.dumps(value, indent=1))
