"""Adaptive search vs the grid on the digits MLP: TPE, ASHA pruning, and vectorized TPE rounds.

The space is learning rate x weight decay x dropout x width (AdamW, a 2-layer MLP on the bundled
digits): 4 x 4 x 2 x 2 = 64 configurations. One process, one machine, measured side by side:

- grid: all 64 trials, trained in full: the best test accuracy and the total training steps.
- TPE: ``--search tpe`` over the same 64 configurations, ``--tpe-trials`` trials, once per seed
  of the search; the median over seeds of the gap to the grid's best, in points (0.01 accuracy).
- GP (``--parts gp``, needs PyTorch): the same with ``--search gp``, Optuna's Gaussian-process
  sampler (random for its first 10 trials).
- ASHA: the grid again, ``--prune asha`` (Optuna's GridSampler in a seeded order, successive
  halving on the evaluations every ``eval_every`` steps); per seed the best accuracy and the
  total steps trained (a pruned trial counts the steps it ran), vs the grid's.
- vectorized: one TPE round of 8 trials as one population (learning rate, weight decay and
  dropout; the width fixed) vs the same 8-trial TPE study trained one trial after another; wall
  time of each from start to results, and of the trials alone (first start to last end, as the
  study records them); then the rounds of a ``--rounds``-round study of the same experiment,
  which reuse the population's compiled program and data as a study's later rounds do. Once
  per seed of the search (``--seeds``), after an untimed small study of each kind, with JAX's
  compilation cache in a new directory (``fresh_cache``: each sequential trial compiles).
- phases (``--parts phases``): where one vectorized round and 8 sequential trials spend their
  time (asking, training, compiling, evaluating, telling, results), as a table.

    python benchmarks/sweep_study.py [--steps 100] [--seeds 5] [--tpe-trials 20] [--rounds 3] \
      [--parts vectorized,tpe,gp,asha,phases]

Prints the machine and ``os.getloadavg()`` beside the numbers: the ratios are what to compare
(the machine is shared).

Measured (x86_64, 2 CPU cores shared with other jobs, load average 6-15, jax 0.10.2): the grid's
best 0.9778 (6,400 steps); TPE 20 trials: the grid's best in 4 of 5 seeds, 0.28 points below in
the fifth (median gap 0.00); GP 20 trials: the grid's best in 3 of 5 seeds, 0.28 points below in
the others; ASHA: the grid's best in 5 of 5 seeds with 0.21-0.30 of the grid's steps (median
0.26). Vectorized (load 1-4), the trials' time of a round of 8 / that of 8 sequential trials:
0.07 (0.07-0.08) for rounds that reuse the study's program, 0.11 (0.09-0.13) for a first round
whose program is in the compilation cache (0.14 end to end), 0.29-0.44 for one that compiles
it (0.32-0.47 end to end, three runs).
"""
from __future__ import annotations

import argparse
import atexit
import os
import platform
import shutil
import statistics
import tempfile
import time

import jax

from deepflow import sweep
from deepflow.config import base_config, finalize
from deepflow.train.writers import read_metrics

SPACE = ("optimizer.learning_rate=3e-4,1e-3,3e-3,1e-2",
         "optimizer.weight_decay=0.0,1e-4,1e-3,1e-2",
         "model.dropout=0.0,0.3",
         "model.hidden=(64, 64),(256, 256)")
RANGES = ("optimizer.learning_rate=loguniform(3e-4,1e-2)",
          "optimizer.weight_decay=uniform(0,1e-2)",
          "model.dropout=uniform(0,0.3)")
SCRATCH = tempfile.mkdtemp(prefix="sweep_study_")  # every study's directory and cache, removed
atexit.register(shutil.rmtree, SCRATCH, True)  # at exit (a full run writes about 0.5 GB)


def digits_mlp(steps: int):
  config = base_config()
  config.data.source = "bundled:digits"
  config.data.batch_size = 64
  config.data.eval_batch_size = 360
  config.model = dict(name="mlp", hidden=(256, 256), dropout=0.1)
  config.optimizer.name = "adamw"
  config.train.steps = steps
  config.train.eval_every = steps // 10
  config.train.log_every = steps // 10
  config.train.checkpoint_every = 0
  config.train.progress = False
  return finalize(config)


def fresh_cache(config):
  """``config`` with JAX's persistent compilation cache in a new, empty directory, for timing: a
  sequential trial's hyperparameters are constants of its program, so each new trial compiles,
  as in a real study (an earlier run of this script would have left its trials' programs, which
  only a rerun of the same values finds); a population's are traced, so it compiles once."""
  cache = tempfile.mkdtemp(prefix="cache_", dir=SCRATCH)
  return sweep.trial_config(config, [f"train.compilation_cache='{cache}'"])


def steps_trained(rows) -> int:
  """Training steps each trial ran (a pruned one stops at its step), summed."""
  return sum(max(r["step"] for r in read_metrics(r["dir"])) for r in rows)


def study(config, texts, **kwargs):
  """(rows with each trial's directory, wall seconds) of a study in a fresh sweep directory."""
  workdir = tempfile.mkdtemp(prefix="study_", dir=SCRATCH)
  start = time.perf_counter()
  rows = sweep.run_study(config, workdir, [sweep.parse_param(t) for t in texts], metric="accuracy",
                         **kwargs)
  elapsed = time.perf_counter() - start
  for r in rows:
    r["dir"] = os.path.join(workdir, r["workdir"])
  return rows, elapsed


def study_trials(rows) -> list:
  """The trials of the study whose rows these are, as its storage holds them."""
  import optuna
  workdir = os.path.dirname(rows[0]["dir"])
  return optuna.load_study(study_name=sweep.STUDY,
                           storage=f"sqlite:///{workdir}/study.db").get_trials()


def span(trials) -> float:
  """Seconds from the first trial's start (its ask) to the last one's end (its tell)."""
  return (max(t.datetime_complete for t in trials) -
          min(t.datetime_start for t in trials)).total_seconds()


def trials_span(rows) -> float:
  """The trials' training alone, as the study recorded it: without the study's setup and the
  results and plots after it."""
  return span(study_trials(rows))


def best(rows) -> float:
  return max(r["accuracy"] for r in rows if r["status"] == "ok")


def load() -> str:
  return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def rounds_spans(rows, size: int) -> list[float]:
  """Seconds of each round of ``size`` trials (first ask to last tell), in order."""
  trials = sorted(study_trials(rows), key=lambda t: t.number)
  return [span(trials[i:i + size]) for i in range(0, len(trials), size)]


def vectorized(config, repeats: int, rounds: int) -> None:
  """TPE rounds of 8 as one population vs 8 sequential TPE trials, ``repeats`` times (seeds 0,
  1, ... of the experiment and the search): a one-round study (its round traces the
  population's program, and compiles it for seed 0; later seeds find it in the compilation
  cache) and the sequential one, end to end and their trials alone; then each round of a
  ``rounds``-round study, which reuses the program as a study's rounds after its first do.
  Untimed first: a small study of each kind (imports, JAX's start)."""
  config, warm = fresh_cache(config), digits_mlp(10)
  study(warm, RANGES, search="tpe", trials=2, population=2)
  study(warm, RANGES, search="tpe", trials=2)
  ratios = {"end to end": [], "first round": [], "rounds reusing the program": []}
  for seed in range(repeats):
    config = sweep.trial_config(config, [f"seed={seed}"])  # a program no earlier round built
    vec_rows, vec_time = study(config, RANGES, search="tpe", trials=8, population=8, seed=seed)
    seq_rows, seq_time = study(config, RANGES, search="tpe", trials=8, seed=seed)
    long_rows, _ = study(config, RANGES, search="tpe", trials=8 * rounds, population=8,
                         seed=seed)
    vec_span, seq_span = trials_span(vec_rows), trials_span(seq_rows)
    spans = rounds_spans(long_rows, 8)
    for name, value in (("end to end", vec_time / seq_time), ("first round", vec_span / seq_span),
                        ("rounds reusing the program", statistics.median(spans) / seq_span)):
      ratios[name].append(value)
    print(f"  seed {seed}: 8 TPE trials as one population {vec_time:.2f} s vs one after "
          f"another {seq_time:.2f} s end to end ({vec_time / seq_time:.2f}); the trials alone "
          f"{vec_span:.2f} vs {seq_span:.2f} s ({vec_span / seq_span:.2f}); then {rounds} rounds: "
          + ", ".join(f"{t:.2f}" for t in spans) + f" s (best {best(vec_rows):.4f} vs "
          f"{best(seq_rows):.4f}); {load()}", flush=True)
  print("vectorized round of 8 / 8 sequential trials, median (range) of "
        f"{repeats}: " + "; ".join(f"{name} {statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"
                                   for name, v in ratios.items()) + f"; {load()}", flush=True)


def adaptive(config, search: str, grid_best: float, seeds: int, trials: int) -> None:
  """``--search tpe`` or ``gp`` over the grid's configurations, once per seed of the search:
  each study's best and its gap to the grid's best, then the median gap."""
  gaps = []
  for seed in range(seeds):
    rows, elapsed = study(config, SPACE, search=search, trials=trials, seed=seed)
    gaps.append(100 * (grid_best - best(rows)))
    print(f"  {search} seed {seed}: best {best(rows):.4f} in {len(rows)} trials "
          f"({gaps[-1]:+.2f} points below the grid's best), {elapsed:.0f} s", flush=True)
  print(f"{search}: median gap {statistics.median(gaps):+.2f} points in {trials} trials; "
        f"{load()}", flush=True)


# Where a study's time goes (``--parts phases``): (module, attribute, name in the table).
PHASES = (("deepflow.sweep.worker", "_Run.prepare", "ask: suggest, claim, config"),
          ("deepflow.sweep.worker", "_Run.surplus", "ask: the study's count"),
          ("optuna.study", "Study.ask", "ask: Optuna"),
          ("deepflow.sweep.worker", "_Run.tell", "tell (rounds; optimize's own in sequence)"),
          ("deepflow.sweep.report", "write", "results and plots"),
          ("deepflow.sweep.population", "Population.__init__", "population: program, pipelines"),
          ("deepflow.sweep.population", "Population.init", "population: init"),
          ("deepflow.train.periodic", "train_members", "population: training loop"),
          ("deepflow.sweep.population", "Population.evaluate", "  population: evaluations"),
          ("deepflow.train.loop", "train_and_evaluate", "trials: train_and_evaluate"),
          ("deepflow.train.fit", "compile_checked", "  trials: compiling the step"),
          ("deepflow.train.experiment", "Experiment.evaluate", "  trials: evaluations"),
          ("deepflow.train.periodic", "LogWindow.fetch", "  either loop: log fetches"))


def timed_phases(run) -> dict[str, float]:
  """Seconds spent in each of ``PHASES`` while ``run()`` runs (the functions wrapped meanwhile)."""
  import functools
  import importlib
  seconds = dict.fromkeys((name for _, _, name in PHASES), 0.0)
  undo = []
  for module, path, name in PHASES:
    owner = importlib.import_module(module)
    *outer, attribute = path.split(".")
    for part in outer:
      owner = getattr(owner, part)
    original = getattr(owner, attribute)

    def wrapper(*args, _original=original, _name=name, **kwargs):
      start = time.perf_counter()
      try:
        return _original(*args, **kwargs)
      finally:
        seconds[_name] += time.perf_counter() - start
    setattr(owner, attribute, functools.wraps(original)(wrapper))
    undo.append((owner, attribute, original))
  try:
    run()
  finally:
    for owner, attribute, original in undo:
      setattr(owner, attribute, original)
  return seconds


def phases(config) -> None:
  """The table of where one vectorized round of 8 (its program compiled, then found in the
  compilation cache by a new experiment seed) and 8 sequential trials spend their time."""
  config = fresh_cache(config)
  study(config, RANGES, search="tpe", trials=8, population=8)  # compiles the program
  config = sweep.trial_config(config, ["seed=1"])  # a program no earlier round built
  rows = {}
  for name, kwargs in (("vectorized round", {"population": 8}), ("8 sequential", {})):
    elapsed = {}

    def run(kwargs=kwargs, elapsed=elapsed):
      elapsed["rows"], elapsed["total"] = study(config, RANGES, search="tpe", trials=8, **kwargs)
    rows[name] = timed_phases(run)
    rows[name]["end to end"] = elapsed["total"]
  print("| phase (s) | " + " | ".join(rows) + " |\n|---|---|---|")
  for phase in ["end to end", *(name for _, _, name in PHASES)]:
    if any(r[phase] for r in rows.values()):
      print(f"| {phase} | " + " | ".join(f"{r[phase]:.2f}" for r in rows.values()) + " |")
  print(load(), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--tpe-trials", type=int, default=20, help="trials of a TPE or GP study")
  parser.add_argument("--rounds", type=int, default=3,
                      help="rounds of the longer vectorized study (its later rounds: no tracing)")
  parser.add_argument("--parts", default="vectorized,tpe,asha",
                      help="which comparisons to run (tpe, gp and asha run the grid first; gp "
                           "needs PyTorch; phases: where a round's time goes)")
  args = parser.parse_args()
  parts = args.parts.split(",")
  config = digits_mlp(args.steps)
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}; digits MLP, AdamW, "
        f"{args.steps} steps of 64 per trial, eval every {config.train.eval_every}; {load()}")
  if "vectorized" in parts:
    vectorized(config, args.seeds, args.rounds)
  if "phases" in parts:
    phases(config)
  if not {"tpe", "gp", "asha"} & set(parts):
    return
  grid_rows, grid_time = study(config, SPACE, search="grid")
  grid_best, grid_steps = best(grid_rows), steps_trained(grid_rows)
  print(f"grid: {len(grid_rows)} trials, best accuracy {grid_best:.4f}, {grid_steps} steps, "
        f"{grid_time:.0f} s; {load()}", flush=True)
  for search in ("tpe", "gp"):
    if search in parts:
      adaptive(config, search, grid_best, args.seeds, args.tpe_trials)
  if "asha" in parts:
    fractions, hits = [], 0
    for seed in range(args.seeds):
      rows, elapsed = study(config, SPACE, search="grid", prune="asha", seed=seed)
      fractions.append(steps_trained(rows) / grid_steps)
      hits += best(rows) >= grid_best
      pruned = sum(r["status"].startswith("pruned") for r in rows)
      print(f"  asha seed {seed}: best {best(rows):.4f}, {pruned} of {len(rows)} pruned, "
            f"{fractions[-1]:.2f} of the grid's steps, {elapsed:.0f} s", flush=True)
    print(f"asha: the grid's best in {hits} of {args.seeds} seeds, median "
          f"{statistics.median(fractions):.2f} of the grid's steps; {load()}", flush=True)

if __name__ == "__main__":
  main()
