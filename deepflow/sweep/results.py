"""A sweep's results: ``results.csv`` (one row per trial), a ranked ``results.md`` and a plot of
the chosen metric (``results.png``), from each trial's ``result.json``."""
from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Iterable, Sequence

from etils import epath

from deepflow.registry import ConfigError

RESULT = "result.json"  # in each trial's directory: {"status": ..., "metrics": {...}}
MAXIMIZE = ("accuracy", "auc", "f1", "precision", "recall")


def default_metric(metrics: Iterable[str]) -> str:
  metrics = sorted(metrics)
  for name in ("accuracy", "rmse", "loss"):
    if name in metrics:
      return name
  return metrics[0]


def write_results(workdir: str, points: Sequence[dict[str, Any]], dirs: Sequence[str],
                  metric: str | None, mode: str | None,
                  numbers: Sequence[int] | None = None) -> list[dict[str, Any]]:
  """``results.csv`` (one row per trial), ``results.md`` (ranked) and ``results.png``; the
  trials are numbered ``numbers`` (a study's trial numbers), else 0, 1, ..."""
  rows, names = [], {}
  for i, (point, d) in enumerate(zip(points, dirs)):
    result = json.loads((epath.Path(d) / RESULT).read_text())
    names.update(dict.fromkeys(result["metrics"]))
    rows.append({"trial": i if numbers is None else numbers[i], **point, **result["metrics"],
                 "status": result["status"], "workdir": os.path.relpath(d, workdir)})
  metric = metric or (default_metric(names) if names else "loss")
  if names and metric not in names:
    raise ConfigError(f"--metric {metric!r} is not an eval metric; known: {', '.join(names)}")
  mode = mode or ("max" if metric in MAXIMIZE else "min")
  if mode not in ("min", "max"):
    raise ConfigError(f"--mode must be 'min' or 'max', got {mode!r}")
  sign = -1.0 if mode == "max" else 1.0

  def rank_key(row):
    value = row.get(metric, float("nan"))
    return (row["status"] != "ok" or math.isnan(value), sign * value if value == value else 0)
  rows.sort(key=rank_key)
  columns = list(dict.fromkeys(k for r in rows for k in r))
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, columns)
  writer.writeheader()
  writer.writerows(rows)
  out = epath.Path(workdir)
  (out / "results.csv").write_text(text.getvalue())
  keys = list(points[0])
  table = ranked_table(rows, keys, metric)
  (out / "results.md").write_text(f"Sweep ranked by {metric} ({mode}):\n\n{table}\n")
  plot(rows, keys, metric, mode, os.path.join(workdir, "results.png"))
  return rows


def ranked_table(rows: Sequence[dict[str, Any]], keys: Sequence[str], metric: str) -> str:
  """A markdown table: rank, trial, swept values, the metric, status."""
  lines = ["| rank | trial | " + " | ".join(keys) + f" | {metric} | status |",
           "|" + "---|" * (len(keys) + 4)]
  for rank, row in enumerate(rows, 1):
    cells = [str(rank), str(row["trial"]), *(_short(row[k]) for k in keys),
             _short(row.get(metric, float("nan"))), row["status"]]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], keys: Sequence[str], metric: str, mode: str,
         path: str) -> None:
  """The metric against the swept value (one numeric key), else one bar per trial, ranked.

  Draws on a bare ``Figure`` with the Agg canvas (no pyplot), so a sweep run from a notebook
  leaves its inline plotting backend alone."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  ok = [r for r in rows if r["status"] == "ok" and metric in r]
  fig = Figure(figsize=(6, 4))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  numeric = len(keys) == 1 and all(isinstance(r[keys[0]], (int, float)) for r in ok)
  if numeric and ok:
    ok = sorted(ok, key=lambda r: r[keys[0]])
    xs = [r[keys[0]] for r in ok]
    ax.plot(xs, [r[metric] for r in ok], "o-")
    if min(xs) > 0 and max(xs) / min(xs) >= 100:
      ax.set_xscale("log")
    ax.set_xlabel(keys[0])
  else:
    labels = [" ".join(f"{k.split('.')[-1]}={_short(r[k])}" for k in keys) for r in ok]
    ax.barh(range(len(ok)), [r[metric] for r in ok])
    ax.set_yticks(range(len(ok)), labels, fontsize=7)
    ax.invert_yaxis()
  ax.set_title(f"{metric} per trial ({mode} is best)")
  ax.set_ylabel(metric) if numeric else ax.set_xlabel(metric)
  fig.tight_layout()
  save_figure(fig, path)


def _short(value: Any) -> str:
  """A value as a table or a plot's label shows it: floats to 4 significant digits (a sampled
  learning rate's 17 would crowd out the bars)."""
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def save_figure(fig, path: str) -> None:
  """A PNG of ``fig`` at ``path``, local or on an object store (``gs://``)."""
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  epath.Path(path).write_bytes(png.getvalue())
