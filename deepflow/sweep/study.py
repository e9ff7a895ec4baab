"""The Optuna study behind an adaptive or shared sweep: its storage (SQLite in the sweep
directory, or PostgreSQL for many workers), sampler, pruner, and the record that keeps every
worker of one study on one experiment and one search space.

Optuna and the PostgreSQL driver are the ``deepflow[search]`` extra; without it, a sweep that
needs a study fails with one line naming the extra (grid, random and vectorized sweeps without
a study need neither).
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Any, Sequence

from ml_collections import ConfigDict

from deepflow.registry import ConfigError
from deepflow.sweep.distributions import Param, grid
from deepflow.train.writers import is_remote

SAMPLERS = ("grid", "random", "tpe", "cmaes", "gp")
PRUNERS = ("none", "median", "asha", "hyperband")
STUDY = "sweep"  # the study's name when --study is not given
STUDY_DB = "study.db"  # the default storage: SQLite in the sweep directory
CONNECT_TIMEOUT_S = 5  # a storage that does not answer fails in seconds, not a hang
MAX_RETRIES = 3  # a trial whose worker died is retried this often
SURPLUS = "surplus"  # user attr of a trial asked past the count (failed, never trained)


def require_optuna(what: str):
  """Optuna, or one line naming the extra that brings it."""
  try:
    import optuna
  except ImportError:
    raise ConfigError(f"{what} needs deepflow's search extra: pip install 'deepflow[search]'"
                      ) from None
  optuna.logging.set_verbosity(optuna.logging.ERROR)
  warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
  return optuna


def check_choices(search: str, prune: str) -> None:
  if search not in SAMPLERS:
    raise ConfigError(f"unknown --search {search!r}; known: {', '.join(SAMPLERS)}")
  if prune not in PRUNERS:
    raise ConfigError(f"unknown --prune {prune!r}; known: {', '.join(PRUNERS)}")


def default_storage(workdir: str) -> str:
  """SQLite in the sweep directory: one machine's workers share it."""
  if is_remote(workdir):
    raise ConfigError(f"a sweep directory on an object store ({workdir}) needs --storage "
                      "postgresql://... (SQLite needs a local file)")
  return f"sqlite:///{os.path.abspath(os.path.join(workdir, STUDY_DB))}"


def open_storage(url: str, heartbeat: int = 60):
  """Optuna's RDB storage at ``url`` with a heartbeat every ``heartbeat`` seconds: a trial whose
  worker stops beating for twice that is failed and retried (``MAX_RETRIES`` times) by the next
  worker that looks, keeping the values it reported. An unreachable server is one line within
  ``CONNECT_TIMEOUT_S`` seconds."""
  optuna = require_optuna("--storage")
  import sqlalchemy
  connect_args = ({"timeout": 60} if url.startswith("sqlite") else
                  {"connect_timeout": CONNECT_TIMEOUT_S})
  for attempt in range(3):
    try:
      return optuna.storages.RDBStorage(
          _with_driver(url), engine_kwargs={"connect_args": connect_args, "pool_pre_ping": True},
          heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
          heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
              MAX_RETRIES, inherit_intermediate_values=True))
    except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
      if attempt == 2:  # workers started together race to create the tables: the loser retries
        raise
      time.sleep(1.0)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
      reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
      raise ConfigError(f"--storage {_redacted(url)} cannot be used: {reason}") from None


def make_sampler(search: str, params: Sequence[Param], seed: int | None):
  optuna = require_optuna(f"--search {search}")
  if search == "grid":
    return optuna.samplers.GridSampler(grid(params), seed=seed)
  if search == "random":
    return optuna.samplers.RandomSampler(seed=seed)
  if search == "tpe":
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)
  if search == "cmaes":
    _require_module("cmaes", "--search cmaes", "deepflow's search extra: pip install "
                    "'deepflow[search]'")
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
  _require_module("torch", "--search gp", "PyTorch (Optuna's GPSampler is written in it): "
                  "pip install torch")
  return optuna.samplers.GPSampler(seed=seed, deterministic_objective=True)


def make_pruner(prune: str, train: ConfigDict):
  """Optuna's pruner, on the run's evaluations (every ``train.eval_every`` steps): median stops a
  trial below the median of the others at the same step, asha (successive halving) and hyperband
  keep the best third at rungs of eval_every x 3^k steps. asha decides only in the first third
  of training: stopping a trial later saves little and, measured on the digits MLP, most often
  stopped the eventual best on a noisy late evaluation."""
  optuna = require_optuna(f"--prune {prune}")
  if prune == "none":
    return optuna.pruners.NopPruner()
  if not train.eval_every:
    raise ConfigError(f"--prune {prune} needs train.eval_every > 0 (it judges the evaluations)")
  if prune == "median":
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=train.eval_every)
  if prune == "asha":
    return _Early(optuna.pruners.SuccessiveHalvingPruner(min_resource=train.eval_every,
                                                         reduction_factor=3), train.steps // 3)
  return optuna.pruners.HyperbandPruner(min_resource=train.eval_every, max_resource=train.steps,
                                        reduction_factor=3)


class _Early:
  """A pruner that decides only up to ``last_step``; later, a trial trains to its end."""

  def __init__(self, pruner, last_step: int):
    self.pruner, self.last_step = pruner, last_step

  def prune(self, study, trial) -> bool:
    step = trial.last_step
    return step is not None and step <= self.last_step and self.pruner.prune(study, trial)


def open_study(storage, name: str, record: dict[str, Any], *, create: bool = True):
  """The study ``name`` in ``storage``, created with ``record`` (experiment, space, metric,
  direction, search) on first use; a worker whose record differs is refused before it writes."""
  optuna = require_optuna("a study")
  try:
    study = optuna.load_study(study_name=name, storage=storage)
  except KeyError:
    if not create:
      raise ConfigError(f"no study {name!r} in the storage") from None
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True,
                                direction="maximize" if record["mode"] == "max" else "minimize")
  if create:
    if not study.user_attrs:  # new, made here or by a worker started at the same moment
      for key, value in record.items():
        study.set_user_attr(key, value)
    differs = [k for k, v in record.items() if study.user_attrs.get(k) != v]
    if differs:
      raise ConfigError(f"study {name!r} was started with another {_what(differs, record, study)}"
                        f"; use another --study or the study's own settings")
  return study


def _what(differs: list[str], record: dict[str, Any], study) -> str:
  if "experiment" in differs:
    from deepflow.sweep.population import _differing_keys
    theirs = study.user_attrs.get("experiment")
    keys = _differing_keys([ConfigDict(record["experiment"]), ConfigDict(theirs)]) if theirs else []
    return f"experiment ({', '.join(keys[:5]) or 'its config'} differ)"
  if "space" in differs:
    return "search space (--sweep)"
  return ", ".join(f"--{k} ({study.user_attrs.get(k)!r}, not {record[k]!r})" for k in differs)


def _with_driver(url: str) -> str:
  """``postgresql://`` with the psycopg (3) driver when psycopg2 is absent: SQLAlchemy's default
  for the bare scheme is psycopg2, the extra installs either."""
  if not url.startswith("postgresql://"):
    return url
  for module, scheme in (("psycopg2", "postgresql+psycopg2://"),
                         ("psycopg", "postgresql+psycopg://")):
    try:
      __import__(module)
      return scheme + url[len("postgresql://"):]
    except ImportError:
      continue
  raise ConfigError("--storage postgresql://... needs deepflow's search extra: pip install "
                    "'deepflow[search]'")


def _redacted(url: str) -> str:
  """The URL without its password, for messages."""
  scheme, sep, rest = url.partition("://")
  user, at, host = rest.rpartition("@")
  return f"{scheme}{sep}{user.split(':')[0]}:***@{host}" if at and ":" in user else url


def _require_module(module: str, what: str, how: str) -> None:
  try:
    __import__(module)
  except ImportError:
    raise ConfigError(f"{what} needs {how}") from None


logging.getLogger("alembic").setLevel(logging.WARNING)
