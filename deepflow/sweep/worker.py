"""A worker of an Optuna study: pulls trials from the study (shared by any number of workers on
any number of machines), trains each in its own sub-workdir of the sweep directory, reports its
evaluations to the pruner and tells the study the result.

A trial is ``trial_NNN`` (its first number), holding ``trial.json`` and, once finished,
``result.json`` as in a grid sweep. A worker killed mid-trial stops its heartbeat; the next worker
to look fails the trial and retries it under a new number in the same directory, so it resumes
from the trial's last checkpoint (bit-identical, as ``train`` resumes). SIGTERM or Ctrl-C saves a
checkpoint and hands the trial back at once. ``trials`` counts fresh trials over the whole
study: retries come on top, and a trial asked past the count by a racing worker is marked
surplus (failed, never trained) and left out of the results.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
import warnings
import zlib
from typing import Any, Sequence

from etils import epath
from ml_collections import ConfigDict

from deepflow import config as config_lib
from deepflow.registry import ConfigError
from deepflow.sweep import report
from deepflow.sweep import study as study_lib
from deepflow.sweep.distributions import Param, check_space, grid, signature, suggest
from deepflow.sweep.results import RESULT, MAXIMIZE
from deepflow.sweep.search import _claim, _write_json
from deepflow.sweep.space import overrides_of, trial_config

log = logging.getLogger("deepflow")


def run_study(base: str | ConfigDict, workdir: str, params: Sequence[Param], *,
              overrides: Sequence[str] = (), search: str = "tpe", prune: str = "none",
              storage: str | None = None, study: str = study_lib.STUDY, trials: int = 0,
              seed: int | None = 0, metric: str | None = None, mode: str | None = None,
              population: int = 0, heartbeat: int = 60) -> list[dict[str, Any]]:
  """Works on the study until it has ``trials`` trials (the grid's size for ``search='grid'``)
  and none is left to retry; then writes the results of the whole study. ``population`` > 0
  trains each round of that many trials as one vmapped population (``--vectorize``)."""
  study_lib.check_choices(search, prune)
  config = trial_config(base, overrides)
  check_space(config, params)
  sampler = study_lib.make_sampler(search, params, seed)
  if search == "grid":
    size = math.prod(len(v) for v in grid(params).values())
    trials = min(trials, size) if trials > 0 else size
  if trials <= 0:
    raise ConfigError(f"--search {search} needs --trials N (how many trials the study runs)")
  if population and search == "grid":
    raise ConfigError("--vectorize with --search grid runs without a study: drop --prune, "
                      "--study and --storage, or use --search random or tpe")
  pruner = study_lib.make_pruner(prune, config.train)
  metric = metric or _task_metric(config)
  mode = mode or ("max" if metric in MAXIMIZE else "min")
  record = {"experiment": json.loads(config_lib.to_json(config)), "space": signature(params),
            "metric": metric, "mode": mode, "search": search, "prune": prune}
  if storage is None:
    storage = study_lib.default_storage(workdir)
    os.makedirs(workdir, exist_ok=True)  # SQLite's file, before it is opened
  store = study_lib.open_storage(storage, heartbeat)
  the_study = study_lib.open_study(store, study, record)
  the_study.sampler, the_study.pruner = sampler, pruner
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  run = _Run(the_study, config, workdir, params, metric, trials, heartbeat, prune != "none")
  if population:
    run.rounds(population)
  else:
    run.sequential()
  return report.write(the_study, workdir, params, metric, mode)


def needs_study(search: str, prune: str, study: str | None, storage: str | None) -> bool:
  """Whether a sweep runs as an Optuna study: a learning sampler, a pruner or a shared study
  (plain grid and random search keep their own trials and files)."""
  return search not in ("grid", "random") or prune != "none" or bool(study or storage)


def worker_seed(seed: int) -> int:
  """The sampler's seed of one worker among many: ``seed`` mixed with the host and process, so
  parallel workers draw different points."""
  return zlib.crc32(f"{seed}:{socket.gethostname()}:{os.getpid()}".encode()) & 0x7FFFFFFF


def study_summary(workdir: str | None, storage: str | None, study: str | None) -> str:
  """``--report``: the study's state and best trials, read from its storage (any machine)."""
  if not storage:
    if not workdir:
      raise ConfigError("--report needs --storage URL (or --workdir, for the default SQLite)")
    storage = study_lib.default_storage(workdir)
    if not os.path.exists(os.path.join(workdir, study_lib.STUDY_DB)):
      raise ConfigError(f"no study in {workdir} ({study_lib.STUDY_DB} is absent)")
  found = study_lib.open_study(study_lib.open_storage(storage), study or study_lib.STUDY, {},
                               create=False)
  return report.summary(found)


class _Run:
  """One worker's state: the study, the experiment and where its trials live."""

  def __init__(self, study, config: ConfigDict, workdir: str, params: Sequence[Param],
               metric: str, trials: int, heartbeat: int, pruning: bool):
    self.study, self.config, self.workdir, self.params = study, config, workdir, params
    self.metric, self.trials, self.heartbeat, self.pruning = metric, trials, heartbeat, pruning

  # -- The study's count: fresh trials, the ones left to retry, and waiting for the running.
  def done(self) -> bool:
    """Whether this worker is done: the study has its trials and none waits for a retry. While
    other workers' trials still run, waits for them (a dead one's trial comes back to retry)."""
    import optuna
    while True:
      optuna.storages.fail_stale_trials(self.study)
      trials = self.study.get_trials(deepcopy=False)
      states = [t.state for t in trials]
      if optuna.trial.TrialState.WAITING in states:
        return False
      if len(_fresh(trials)) < self.trials:
        return False
      if optuna.trial.TrialState.RUNNING not in states:
        return True
      time.sleep(self.heartbeat)

  def surplus(self, trial) -> bool:
    """A fresh trial asked past the count (workers raced for the last ones)."""
    frozen = self.study._storage.get_trial(trial._trial_id)
    if "failed_trial" in frozen.system_attrs:
      return False
    before = [t for t in _fresh(self.study.get_trials(deepcopy=False)) if t.number < trial.number]
    return len(before) >= self.trials

  def directory(self, trial) -> str:
    """``trial_NNN`` of the trial's first number: a retry resumes in its original's directory."""
    frozen = self.study._storage.get_trial(trial._trial_id)
    first = frozen.system_attrs.get("failed_trial", trial.number)
    return os.path.join(self.workdir, f"trial_{first:03d}")

  def prepare(self, trial) -> tuple[ConfigDict, str]:
    point = suggest(trial, self.params)
    directory = self.directory(trial)
    _claim(directory, point)
    return trial_config(self.config, overrides_of(point)), directory

  # -- Sequential trials, through Optuna's optimize loop (heartbeat, stale-trial retries).
  def sequential(self) -> None:
    if self.done():
      return

    def stop_when_done(study, _):
      if self.done():
        study.stop()
    self.study.optimize(self.objective, callbacks=[stop_when_done],
                        catch=(_Surplus, _Failed), gc_after_trial=False)

  def objective(self, trial) -> float:
    import optuna
    import deepflow
    from deepflow.train import NonFiniteLossError, Preempted
    from deepflow.train.errors import Stopped
    if self.surplus(trial):
      trial.set_user_attr(study_lib.SURPLUS, True)
      raise _Surplus()
    config, directory = self.prepare(trial)
    log.info("sweep: trial %d in %s", trial.number, directory)
    try:
      metrics = deepflow.train_and_evaluate(config, directory,
                                            on_eval=self.reporter(trial))
    except Stopped as e:
      _write_json(os.path.join(directory, RESULT),
                  {"status": f"pruned at step {e.step}", "metrics": e.metrics})
      raise optuna.TrialPruned(f"pruned at step {e.step}") from None
    except NonFiniteLossError as e:
      _write_json(os.path.join(directory, RESULT),
                  {"status": f"failed: {str(e).splitlines()[0]}", "metrics": {}})
      raise _Failed(str(e)) from None
    except (Preempted, KeyboardInterrupt):
      self.hand_back(trial)
      raise
    _write_json(os.path.join(directory, RESULT), {"status": "ok", "metrics": metrics})
    return self.value(metrics)

  def reporter(self, trial):
    """The loop's ``on_eval``: reports the metric to the trial; True (stop) when pruned. None
    without a pruner: nothing would read the reports, and each is a write to the storage."""
    if not self.pruning:
      return None

    def on_eval(step: int, metrics: dict[str, float]) -> bool:
      trial.report(self.value(metrics), step)
      return trial.should_prune()
    return on_eval

  def value(self, metrics: dict[str, float]) -> float:
    if self.metric not in metrics:
      raise ConfigError(f"--metric {self.metric!r} is not an eval metric; known: "
                        f"{', '.join(sorted(metrics))}")
    return float(metrics[self.metric])

  def hand_back(self, trial) -> None:
    """A stopped worker's trial goes back to the study at once, as a dead one's would."""
    callback = self.study._storage.get_heartbeat_stale_trial_callback()
    callback(self.study, self.study._storage.get_trial(trial._trial_id))
    log.info("sweep: trial %d handed back to the study; another worker resumes it",
             trial.number)

  # -- Vectorized rounds: ask a population's worth, train them as one program, tell each.
  def rounds(self, size: int) -> None:
    import optuna
    from deepflow.sweep.population import train_population
    from optuna.storages._heartbeat import get_heartbeat_thread
    while not self.done():
      asked = []
      for _ in range(size):
        with warnings.catch_warnings():  # the heartbeat is ours here, not optimize's
          warnings.simplefilter("ignore")
          trial = self.study.ask()
        if self.surplus(trial):
          trial.set_user_attr(study_lib.SURPLUS, True)
          self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
          break
        asked.append(trial)
      if not asked:
        return
      prepared = [self.prepare(t) for t in asked]
      log.info("sweep: trials %s as one population", ", ".join(str(t.number) for t in asked))
      with contextlib.ExitStack() as beats:
        for t in asked:
          beats.enter_context(get_heartbeat_thread(t._trial_id, self.study._storage))
        _, results = train_population([c for c, _ in prepared], [d for _, d in prepared],
                                      on_eval=self.member_reporter(asked),
                                      keys=[p.key for p in self.params])
      for trial, (_, directory), result in zip(asked, prepared, results):
        _write_json(os.path.join(directory, RESULT), result)
        self.tell(trial, result)

  def member_reporter(self, asked):
    """``train_population``'s ``on_eval``: ``reporter``'s, per member."""
    if not self.pruning:
      return None
    reporters = [self.reporter(trial) for trial in asked]
    return lambda step, live: {i for i, metrics in live.items() if reporters[i](step, metrics)}

  def tell(self, trial, result: dict[str, Any]) -> None:
    import optuna
    state = optuna.trial.TrialState
    if result["status"] == "ok":
      self.study.tell(trial, self.value(result["metrics"]))
    else:
      pruned = result["status"].startswith("pruned")
      self.study.tell(trial, state=state.PRUNED if pruned else state.FAIL)


class _Surplus(Exception):
  """A trial asked past the study's count: failed unrun."""


class _Failed(Exception):
  """A trial whose loss became non-finite: failed (its result.json says where)."""


def _fresh(trials) -> list:
  """The study's own trials: neither retries nor surplus."""
  return [t for t in trials
          if "failed_trial" not in t.system_attrs and not t.user_attrs.get(study_lib.SURPLUS)]


def _task_metric(config: ConfigDict) -> str:
  """The metric a study optimizes by default: accuracy for a classifier, rmse for a regressor,
  else the loss (the same choice as a grid sweep's ranking)."""
  return {"classification": "accuracy", "regression": "rmse"}.get(config.task.name, "loss")
