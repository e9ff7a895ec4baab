"""A study's results: ``results.csv`` / ``results.md`` / ``results.png`` as a grid sweep writes
them (from each trial's ``result.json``), Optuna's optimization history, parallel-coordinate and
parameter-importance plots, and the summary ``deepflow sweep --report`` prints from any machine.
"""
from __future__ import annotations

import collections
import logging
import os
import warnings
from typing import Any, Sequence

from etils import epath

from deepflow.sweep.distributions import Param
from deepflow.sweep.results import RESULT, ranked_table, save_figure, write_results
from deepflow.sweep.study import SURPLUS

log = logging.getLogger("deepflow")
PLOTS = {"history.png": "plot_optimization_history",
         "parallel_coordinate.png": "plot_parallel_coordinate",
         "importances.png": "plot_param_importances"}


def write(study, workdir: str, params: Sequence[Param], metric: str,
          mode: str) -> list[dict[str, Any]]:
  """Writes the study's results into the sweep directory; returns the ranked rows."""
  trials = [(first, t) for first, t in _by_directory(study)
            if (epath.Path(workdir) / f"trial_{first:03d}" / RESULT).exists()]
  if not trials:
    return []
  keys = [p.key for p in params]
  points = [{k: _shown(t.params.get(k)) for k in keys} for _, t in trials]
  dirs = [os.path.join(workdir, f"trial_{first:03d}") for first, _ in trials]
  rows = write_results(workdir, points, dirs, metric, mode, numbers=[f for f, _ in trials])
  plots(study, workdir)
  return rows


def plots(study, workdir: str) -> list[str]:
  """Optuna's matplotlib plots of the study (those its trials allow: the importances need two
  completed trials with different values), saved in ``workdir``; returns their names."""
  import matplotlib.pyplot as plt
  from optuna.visualization import matplotlib as optuna_plots
  written = []
  for name, function in PLOTS.items():
    try:
      with warnings.catch_warnings():  # few trials: Optuna warns of flat axes, equal importances
        warnings.simplefilter("ignore")
        ax = getattr(optuna_plots, function)(study)
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
      log.info("sweep: no %s yet (%s)", name, str(e).splitlines()[0] if str(e) else e)
      continue
    figure = ax.flat[0].figure if hasattr(ax, "flat") else ax.figure
    figure.set_size_inches(8, 5)
    figure.tight_layout()
    save_figure(figure, os.path.join(workdir, name))
    plt.close(figure)
    written.append(name)
  return written


def summary(study, top: int = 10) -> str:
  """The study's state and its best trials so far, ranked, as text (``--report``)."""
  counts = collections.Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
  metric, mode = study.user_attrs.get("metric", "value"), study.user_attrs.get("mode", "min")
  done = [t for _, t in _by_directory(study) if t.state.name == "COMPLETE"]
  done.sort(key=lambda t: -t.value if mode == "max" else t.value)
  keys = list(dict.fromkeys(k for t in done for k in t.params))
  rows = [{"trial": t.number, **{k: _shown(t.params.get(k)) for k in keys}, metric: t.value,
           "status": "ok"} for t in done[:top]]
  state = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
  head = f"study {study.study_name!r}: {state or 'no trials'}; best {top} by {metric} ({mode}):"
  return f"{head}\n\n{ranked_table(rows, keys, metric)}"


def _by_directory(study) -> list[tuple[int, Any]]:
  """(first number, trial) of the study's trials that count, in order: finished, not surplus,
  and the last try of each trial directory (a trial retried after its worker died counts once,
  as its retry)."""
  last: dict[int, Any] = {}
  for t in study.get_trials(deepcopy=False):
    if not t.user_attrs.get(SURPLUS):
      last[t.system_attrs.get("failed_trial", t.number)] = t
  return [(first, t) for first, t in sorted(last.items()) if t.state.is_finished()]


def _shown(value: Any) -> Any:
  return "" if value is None else value
