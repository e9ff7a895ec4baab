"""Hyperparameter sweeps: grid or random search over config keys, one trial after another or as one
vmapped population.

``deepflow sweep --config FILE --workdir DIR --sweep optimizer.learning_rate=1e-4,1e-3,1e-2
--sweep model.dropout=0,0.1 [--trials N] [--vectorize]``

Each trial is a config override set with its own sub-workdir (``DIR/trial_000``, ...) holding
``trial.json`` (its overrides) and, once finished, ``result.json`` (its final eval metrics).
Sequential trials are ordinary runs, so an interrupted sweep resumes its unfinished trial and
skips finished ones. ``--vectorize`` trains all trials in one compiled program: the train step is
``jax.vmap``-ed over a population axis of TrainStates whose swept hyperparameters (learning rate,
weight decay, Adam's betas, dropout rate, seed) are traced values, so trial ``i`` computes what
the same config trained alone would. At the end the sweep writes ``results.csv``, a ranked
``results.md`` and a plot of the chosen metric (``results.png``).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import itertools
import json
import logging
import math
import os
import re
import types
from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepflow import config as config_lib
from deepflow.config import ConfigDict
from deepflow.registry import ConfigError

log = logging.getLogger("deepflow")

RESULT, TRIAL = "result.json", "trial.json"
# Keys that change no shape or Python branch, so one compiled program serves every value.
VECTORIZABLE = ("seed", "model.dropout", "optimizer.learning_rate", "optimizer.weight_decay",
                "optimizer.end_learning_rate", "optimizer.b1", "optimizer.b2", "optimizer.eps")
MAXIMIZE = ("accuracy", "auc", "f1", "precision", "recall")


# ------------------------------------------------------------------------------------------------
# Search spaces and trials.
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Axis:
  """One swept key: a list of values, or (random search only) a range ``uniform(a,b)``,
  ``loguniform(a,b)`` or ``randint(a,b)`` (both ends included)."""
  key: str
  values: tuple = ()
  distribution: str = ""
  low: float = 0.0
  high: float = 0.0

  def sample(self, rng: np.random.Generator) -> Any:
    if not self.distribution:
      return self.values[rng.integers(len(self.values))]
    if self.distribution == "randint":
      return int(rng.integers(int(self.low), int(self.high) + 1))
    if self.distribution == "loguniform":
      value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
    else:
      value = rng.uniform(self.low, self.high)
    return float(f"{value:.4g}")  # readable overrides and trial names


_RANGE = re.compile(r"^(uniform|loguniform|randint)\(\s*([^,]+)\s*,\s*([^,]+)\s*\)$")


def parse_axis(text: str) -> Axis:
  """``key=v1,v2,...`` (values as on the command line; commas inside brackets stay) or
  ``key=loguniform(1e-4,1e-2)`` and friends."""
  key, sep, rest = text.partition("=")
  if not sep or not key or not rest:
    raise ConfigError(f"--sweep {text!r} is not KEY=V1,V2,... or KEY=loguniform(A,B)")
  match = _RANGE.match(rest.strip())
  if match:
    kind, low, high = match.group(1), config_lib.parse_value(match.group(2)), \
        config_lib.parse_value(match.group(3))
    if not all(isinstance(v, (int, float)) for v in (low, high)) or not low < high or (
        kind == "loguniform" and low <= 0):
      raise ConfigError(f"--sweep {text!r}: need numbers 0 < low < high for {kind}")
    return Axis(key.strip(), distribution=kind, low=low, high=high)
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(rest):
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      parts.append(rest[start:i])
      start = i + 1
  parts.append(rest[start:])
  if any(not p.strip() for p in parts):
    raise ConfigError(f"--sweep {text!r} has an empty value")
  return Axis(key.strip(), values=tuple(config_lib.parse_value(p.strip()) for p in parts))


def make_trials(axes: Sequence[Axis], trials: int = 0, seed: int = 0) -> list[dict[str, Any]]:
  """The trials' overrides: the full grid (``trials`` = 0), or ``trials`` random draws, each key
  independently (deterministic from ``seed``, so a rerun finds the same trials)."""
  keys = [a.key for a in axes]
  if len(set(keys)) != len(keys):
    raise ConfigError(f"a key is swept twice: {', '.join(keys)}")
  if trials <= 0:
    ranged = [a.key for a in axes if a.distribution]
    if ranged:
      raise ConfigError(f"{', '.join(ranged)}: a range needs random search (--trials N)")
    return [dict(zip(keys, combo)) for combo in itertools.product(*(a.values for a in axes))]
  rng = np.random.default_rng(seed)
  return [{a.key: a.sample(rng) for a in axes} for _ in range(trials)]


def overrides_of(trial: dict[str, Any]) -> list[str]:
  return [f"{k}={v!r}" for k, v in trial.items()]


def trial_config(base: str | ConfigDict, overrides: Iterable[str]) -> ConfigDict:
  """A trial's config: the experiment file (or a config) with the overrides, validated."""
  if isinstance(base, ConfigDict):
    return config_lib.finalize(ConfigDict(base.to_dict()), overrides)
  return config_lib.load_config(base, overrides)


def default_metric(metrics: Iterable[str]) -> str:
  metrics = sorted(metrics)
  for name in ("accuracy", "rmse", "loss"):
    if name in metrics:
      return name
  return metrics[0]


# ------------------------------------------------------------------------------------------------
# Running a sweep.
# ------------------------------------------------------------------------------------------------

def run_sweep(base: str | ConfigDict, workdir: str, axes: Sequence[Axis], *,
              overrides: Sequence[str] = (), trials: int = 0, seed: int = 0,
              vectorize: bool = False, metric: str | None = None,
              mode: str | None = None) -> list[dict[str, Any]]:
  """Runs (or resumes) the sweep in ``workdir``; returns the rows of ``results.csv``, ranked."""
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
    _, metrics = train_population([configs[i] for i in pending], [dirs[i] for i in pending])
    for i, m in zip(pending, metrics):
      _write_json(os.path.join(dirs[i], RESULT), {"status": "ok", "metrics": m})
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
  path = os.path.join(trial_dir, TRIAL)
  record = {"overrides": overrides_of(point)}
  if os.path.exists(path):
    with open(path) as f:
      if json.load(f) != record:
        raise ConfigError(f"{trial_dir} belongs to a different sweep; use a new --workdir")
    return
  os.makedirs(trial_dir, exist_ok=True)
  _write_json(path, record)


def _write_json(path: str, value: Any) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=1)
  os.replace(path + ".tmp", path)


def write_results(workdir: str, points: Sequence[dict[str, Any]], dirs: Sequence[str],
                  metric: str | None, mode: str | None) -> list[dict[str, Any]]:
  """``results.csv`` (one row per trial), ``results.md`` (ranked) and ``results.png``."""
  rows, names = [], {}
  for i, (point, d) in enumerate(zip(points, dirs)):
    with open(os.path.join(d, RESULT)) as f:
      result = json.load(f)
    names.update(dict.fromkeys(result["metrics"]))
    rows.append({"trial": i, **point, **result["metrics"], "status": result["status"],
                 "workdir": os.path.relpath(d, workdir)})
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
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)
  keys = list(points[0])
  table = ranked_table(rows, keys, metric)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(f"Sweep ranked by {metric} ({mode}):\n\n{table}\n")
  plot(rows, keys, metric, mode, os.path.join(workdir, "results.png"))
  return rows


def ranked_table(rows: Sequence[dict[str, Any]], keys: Sequence[str], metric: str) -> str:
  """A markdown table: rank, trial, swept values, the metric, status."""
  def fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| rank | trial | " + " | ".join(keys) + f" | {metric} | status |",
           "|" + "---|" * (len(keys) + 4)]
  for rank, row in enumerate(rows, 1):
    cells = [str(rank), str(row["trial"]), *(fmt(row[k]) for k in keys),
             fmt(row.get(metric, float("nan"))), row["status"]]
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
    labels = [" ".join(f"{k.split('.')[-1]}={r[k]}" for k in keys) for r in ok]
    ax.barh(range(len(ok)), [r[metric] for r in ok])
    ax.set_yticks(range(len(ok)), labels, fontsize=7)
    ax.invert_yaxis()
  ax.set_title(f"{metric} per trial ({mode} is best)")
  ax.set_ylabel(metric) if numeric else ax.set_xlabel(metric)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def seeded_variants(variants: dict[str, Sequence[str]], seeds: int,
                    overrides: Sequence[str] = ()) -> dict[str, list[str]]:
  """Each named override set once per seed (``NAME/seedS``), with ``overrides`` for every run:
  the runs behind a table of means over seeds."""
  return {f"{name}/seed{s}": [*v, f"seed={s}", *overrides]
          for name, v in variants.items() for s in range(seeds)}


def seed_means_table(results: dict, names: Sequence[str], seeds: int, keys: Sequence[str], *,
                     first_column: str, split: str = "test") -> str:
  """A Markdown table: one row per variant, the mean over seeds of each metric in ``keys``
  (``results`` as ``run_variants`` returns them for ``seeded_variants``)."""
  lines = [f"| {first_column} | {' | '.join(keys)} |  ({split} split, mean of {seeds} seeds)",
           "|---|" + "---|" * len(keys)]
  for name in names:
    runs = [results[f"{name}/seed{s}"][split] for s in range(seeds)]
    lines.append(f"| {name} | " + " | ".join(f"{sum(r[k] for r in runs) / len(runs):.4f}"
                                            for k in keys) + " |")
  return "\n".join(lines)


def run_variants(base: str | ConfigDict, workdir: str, variants: dict[str, Sequence[str]], *,
                 splits: Sequence[str] = ()) -> dict[str, dict[str, dict[str, float]]]:
  """Named override sets (an ablation or a ladder), each trained in ``workdir/NAME`` (resumable:
  a finished one is only evaluated). Returns, per variant, the final metrics of its eval split
  and of each extra split in ``splits`` (e.g. 'train', to measure the train/eval gap),
  evaluated on the state the run returns (the best one under early stopping)."""
  import deepflow
  from deepflow.train.experiment import Experiment
  results = {}
  for name, overrides in variants.items():
    config = trial_config(base, overrides)
    run = os.path.join(workdir, name)
    results[name] = {config.data.eval_split: deepflow.train_and_evaluate(config, run)}
    if splits:
      exp, state, _, _ = Experiment.from_workdir(run)  # the run's result, as returned above
      for split in splits:
        results[name][split] = exp.evaluate(state, split)
  return results


# ------------------------------------------------------------------------------------------------
# Vectorized: one population, one compiled program.
# ------------------------------------------------------------------------------------------------

_SWEPT_DROPOUT = 0.123456789  # marks the Dropout layers whose rate is the traced swept value


@contextlib.contextmanager
def traced_dropout(rate: jax.Array | None):
  """Inside the block, every ``nn.Dropout`` built with rate ``_SWEPT_DROPOUT`` drops with the
  traced ``rate`` instead. Written here because Linen's Dropout branches on its rate in Python
  (so it cannot be traced); the mask is drawn exactly as Linen draws it (same key, bernoulli of
  the keep probability), so a population member equals its trial trained alone."""
  if rate is None:
    yield
    return

  def interceptor(next_fn, args, kwargs, context):
    module = context.module
    if (not isinstance(module, nn.Dropout) or context.method_name != "__call__"
        or module.rate != _SWEPT_DROPOUT):
      return next_fn(*args, **kwargs)
    inputs = args[0]
    deterministic = nn.merge_param("deterministic", module.deterministic,
                                   args[1] if len(args) > 1 else kwargs.get("deterministic"))
    if deterministic:
      return inputs
    rng = kwargs.get("rng")
    if rng is None:
      rng = module.make_rng(module.rng_collection)
    keep = 1.0 - rate  # float32, as Linen's Python float becomes: the same uniform draws
    shape = [1 if d in module.broadcast_dims else n for d, n in enumerate(inputs.shape)]
    mask = jnp.broadcast_to(jax.random.bernoulli(rng, p=keep, shape=shape), inputs.shape)
    return jax.lax.select(mask, inputs / keep.astype(inputs.dtype), jnp.zeros_like(inputs))

  with nn.intercept_methods(interceptor):
    yield


class Population:
  """Configs that differ only in ``VECTORIZABLE`` keys, as one vmapped program: ``init()`` gives
  the stacked TrainState (leading axis = member), ``train_step(state, batch, hyper)`` and
  ``eval_step(state, batch)`` are jitted over the whole population."""

  def __init__(self, configs: Sequence[ConfigDict]):
    from deepflow.data.pipeline import Pipeline
    from deepflow.registry import TASKS
    from deepflow.tasks.base import Task
    from deepflow.train.step import make_eval_step, make_train_step

    self.configs = list(configs)
    base = self.base = self.configs[0]
    swept = _differing_keys(self.configs)
    fixed = [k for k in swept if k not in VECTORIZABLE]
    if fixed:
      raise ConfigError(f"--vectorize cannot sweep {', '.join(fixed)} (it changes shapes or the "
                        f"program); vectorizable: {', '.join(VECTORIZABLE)}")
    if jax.process_count() > 1:
      raise ConfigError("--vectorize runs on one host; sweep sequentially on several")
    if any(e["name"] == "early_stopping" for e in base.regularizers):
      raise ConfigError("--vectorize does not support early_stopping; sweep sequentially")

    # Data: one pipeline per distinct seed (the seed orders the batches, and may make the data).
    self.seeds = [int(c.seed) for c in self.configs]
    self.pipelines = {s: Pipeline(trial_config(base, [f"seed={s}"]))
                      for s in dict.fromkeys(self.seeds)}
    self.per_member_data = len(self.pipelines) > 1
    spec = self.pipelines[self.seeds[0]].spec

    # The task, with the swept dropout layers marked; the optimizer built from traced options.
    overrides = [f"model.dropout={_SWEPT_DROPOUT}"] if "model.dropout" in swept else []
    self.task = task = TASKS.get(base.task.name)(trial_config(base, overrides), spec)
    if type(task).optimizer is not Task.optimizer:
      raise ConfigError(f"--vectorize does not support task {base.task.name!r} (own optimizer)")
    self.hyper = {k: jnp.asarray([float(_get(c, k)) for c in self.configs], jnp.float32)
                  for k in swept if k != "seed"}

    def member_step(state, batch, hp):
      with traced_dropout(hp.get("model.dropout")):
        return make_train_step(task, self.optimizer(hp), base.train.microbatches)(state, batch)

    batch_axis = 0 if self.per_member_data else None
    self.train_step = jax.jit(jax.vmap(member_step, in_axes=(0, batch_axis, 0)),
                              donate_argnums=0)
    self.eval_step = jax.jit(jax.vmap(make_eval_step(task), in_axes=(0, batch_axis)))

  def optimizer(self, hp: dict[str, jax.Array]):
    """The configured optax chain with the swept optimizer options taken from ``hp``."""
    from deepflow.optim import build_optimizer
    options = self.base.optimizer.to_dict()
    options.update({k.split(".", 1)[1]: v for k, v in hp.items() if k.startswith("optimizer.")})
    return build_optimizer(types.SimpleNamespace(**options), self.base.train.steps,
                           gradient=self.task.regularizer.gradient,
                           projection=self.task.regularizer.projection)

  def init(self):
    from deepflow.train.state import create_state
    init = lambda seed, hp: create_state(self.task, self.optimizer(hp), seed)  # noqa: E731
    return jax.jit(jax.vmap(init))(jnp.asarray(self.seeds), self.hyper)

  def batch(self, batches: dict[int, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One batch for all members, or each member's from its seed's pipeline (seed swept)."""
    if not self.per_member_data:
      return batches[self.seeds[0]]
    return {k: np.stack([batches[s][k] for s in self.seeds]) for k in batches[self.seeds[0]]}

  def evaluate(self, state) -> list[dict[str, float]]:
    """Each member's metrics over the whole eval split."""
    from deepflow.data.pipeline import MASK
    chunks = []
    split = self.base.data.eval_split
    for batches in zip(*(p.eval_batches(split) for p in self.pipelines.values())):
      out = jax.device_get(self.eval_step(state, self.batch(dict(zip(self.pipelines, batches)))))
      mask = np.asarray(out.pop(MASK))[0] > 0  # the same rows for every member
      chunks.append({k: np.asarray(v)[:, mask] for k, v in out.items()})
    return [self.task.summarize({k: np.concatenate([c[k][i] for c in chunks]) for k in chunks[0]})
            for i in range(len(self.configs))]


def train_population(configs: Sequence[ConfigDict], workdirs: Sequence[str]):
  """Trains every config as one member of a vmapped ``Population``. Writes each member's
  ``config.json`` and ``metrics.jsonl`` in its workdir (no checkpoints: a population is rerun
  whole); returns the stacked final TrainState and each member's final eval metrics."""
  from deepflow.train.writers import MetricWriter
  population = Population(configs)
  cfg, split = population.base.train, population.base.data.eval_split
  for c, d in zip(configs, workdirs):
    with open(os.path.join(d, "config.json"), "w") as f:
      f.write(config_lib.to_json(c))
  writers = [MetricWriter(d) for d in workdirs]
  state = population.init()
  iterators = {s: p.train_iterator() for s, p in population.pipelines.items()}
  pending = []
  try:
    for step in range(1, cfg.steps + 1):
      batch = population.batch({s: next(it) for s, it in iterators.items()})
      state, metrics = population.train_step(state, batch, population.hyper)
      pending.append(metrics)
      if step % cfg.log_every == 0 or step == cfg.steps:
        host = jax.device_get(pending)
        pending.clear()
        for i, writer in enumerate(writers):
          means = {k: float(np.mean([m[k][i] for m in host])) for k in host[0] if k != "nonfinite"}
          means["nonfinite_steps"] = float(sum(m["nonfinite"][i] for m in host))
          writer.write(step, "train", means)
      if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
        for writer, m in zip(writers, population.evaluate(state)):
          writer.write(step, split, m)
    final = population.evaluate(state)
    for writer, m in zip(writers, final):
      writer.write(cfg.steps, split, m)
  finally:
    for writer in writers:
      writer.close()
  return state, final


def _get(config: ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _differing_keys(configs: Sequence[ConfigDict]) -> list[str]:
  """Dotted keys whose values differ between the configs."""
  flat = [_flatten(c.to_dict()) for c in configs]
  return sorted(k for k in flat[0] if any(f.get(k) != flat[0][k] for f in flat[1:]))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = json.dumps(value, sort_keys=True, default=str)
  return out
