"""Optuna studies: the search space syntax, one-line refusals that write nothing, pruning from the
run's own evaluations (sequential trials and population members), and workers on one PostgreSQL
study (a real server), one of them killed mid-trial."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import deepflow
import helpers
import postgres
from deepflow import sweep
from deepflow.registry import ConfigError
from deepflow.train.writers import read_metrics

optuna = pytest.importorskip("optuna", reason="needs deepflow's search extra")


@pytest.fixture(scope="module")
def postgres_url():
  if postgres.binaries() is None:
    pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
  with postgres.server() as url:
    yield url


def params(*texts):
  return [sweep.parse_param(t) for t in texts]


def test_space_syntax_suggests_conditional_keys():
  space = params("optimizer.name=sgd,adam", "model.hidden=choice((16, 32),(8,))",
                 "optimizer.momentum=uniform(0.5,0.99)@optimizer.name=sgd",
                 "optimizer.learning_rate=loguniform(1e-4,1e-1)")
  assert space[1].axis.values == ((16, 32), (8,)) and space[2].when == ("optimizer.name", "sgd")
  sweep.distributions.check_space(helpers.tiny_config(), space)
  study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
  points = [sweep.distributions.suggest(study.ask(), space) for _ in range(30)]
  assert {p["optimizer.name"] for p in points} == {"sgd", "adam"}
  for p in points:
    assert ("optimizer.momentum" in p) == (p["optimizer.name"] == "sgd")
    assert p["model.hidden"] in ((16, 32), (8,)) and 1e-4 <= p["optimizer.learning_rate"] <= 0.1
  sweep.trial_config(helpers.tiny_config(), sweep.overrides_of(points[0]))  # a valid config


@pytest.mark.parametrize("texts, kwargs, message", [
    (["optimizer.learning_rate=loguniform(1e-4,"], {}, "is not KEY=V1"),
    (["model.name=uniform(0,1)"], {}, "model.name is 'mlp' in the experiment, not a number"),
    (["optimizer.momentum=uniform(0,1)@optimizer.name=sgd"], {}, "is not one of the listed"),
    (["seed=0,1"], {"search": "annealing"}, "unknown --search 'annealing'"),
    (["seed=0,1"], {"prune": "patient"}, "unknown --prune 'patient'"),
    (["seed=uniform(0,1)"], {"search": "grid", "prune": "median"}, "a range needs a sampler"),
    (["seed=0,1"], {"trials": 0}, "--search tpe needs --trials N"),
    (["seed=0,1"], {"storage": "postgresql://deepflow:secret@127.0.0.1:{port}/db"},
     "cannot be used: connection failed"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, texts, kwargs, message):
  workdir = tmp_path / "sweep"
  kwargs = {"search": "tpe", "trials": 2, **kwargs}
  if "storage" in kwargs:
    kwargs["storage"] = kwargs["storage"].format(port=helpers.free_port())
  start = time.perf_counter()
  with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as error:
    sweep.run_study(helpers.tiny_config(), str(workdir), params(*texts), **kwargs)
  assert time.perf_counter() - start < 10 and "\n" not in str(error.value)
  assert "secret" not in str(error.value) and not workdir.exists()


@pytest.mark.parametrize("module, search, message", [
    ("optuna", "tpe", r"deepflow's search extra: pip install 'deepflow\[search\]'"),
    ("torch", "gp", r"PyTorch \(Optuna's GPSampler is written in it\): pip install torch")])
def test_without_its_library_a_study_is_one_line_naming_it(tmp_path, monkeypatch, module,
                                                           search, message):
  monkeypatch.setitem(sys.modules, module, None)  # import MODULE raises ImportError
  with pytest.raises(ConfigError, match=rf"^--search {search} needs {message}$"):
    sweep.run_study(helpers.tiny_config(), str(tmp_path / "sweep"), params("seed=0,1"),
                    search=search, trials=2)
  assert not (tmp_path / "sweep").exists()


def test_cli_gp_without_torch_is_one_line(tmp_path):
  """As the command runs where PyTorch is not installed (it is no dependency of deepflow)."""
  experiment = helpers.write_experiment(tmp_path / "tiny.py", helpers.TINY_EXPERIMENT)
  blocked = ("import sys; sys.modules['torch'] = None; from deepflow.cli import run; "
             "run(sys.argv)")
  out = subprocess.run([sys.executable, "-c", blocked, "sweep", f"--config={experiment}",
                        f"--workdir={tmp_path / 'sweep'}", "--search=gp", "--trials=2",
                        "--sweep=optimizer.learning_rate=loguniform(1e-3,1e-1)"],
                       capture_output=True, text=True, timeout=120,
                       env=helpers.subprocess_environment())
  assert out.returncode == 1 and out.stderr.strip().splitlines() == [
      "deepflow: error: --search gp needs PyTorch (Optuna's GPSampler is written in it): pip install "
      "torch"]
  assert not (tmp_path / "sweep").exists()


def tiny(*overrides):
  return helpers.tiny_config("train.steps=12", "train.eval_every=3", "train.checkpoint_every=6",
                             *overrides)


def test_a_study_refuses_another_space_or_experiment_and_reports(tmp_path):
  workdir = str(tmp_path)
  space = params("optimizer.learning_rate=loguniform(1e-3,1e-1)")
  rows = sweep.run_study(tiny(), workdir, space, search="random", trials=1)
  assert [r["trial"] for r in rows] == [0] and rows[0]["status"] == "ok"
  for name in ("results.md", "results.csv", "history.png", "parallel_coordinate.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  for other, kwargs, message in (
      (tiny(), {"space": params("optimizer.learning_rate=loguniform(1e-3,1)")}, "search space"),
      (tiny("train.steps=10"), {}, r"experiment \(train.steps differ\)"),
      (tiny(), {"search": "tpe"}, "another --search")):
    with pytest.raises(ConfigError, match=message):
      sweep.run_study(other, workdir, kwargs.pop("space", space),
                      **{"search": "random", "trials": 2, **kwargs})
  assert sorted(d for d in os.listdir(workdir) if d.startswith("trial_")) == ["trial_000"]
  summary = sweep.study_summary(workdir, None, None)
  assert summary.startswith("study 'sweep': 1 complete; best 10 by accuracy (max):")
  assert f"| 1 | 0 | {rows[0]['optimizer.learning_rate']:.4g} |" in summary


def test_pruned_trials_stop_at_their_pruned_step(tmp_path):
  """ASHA on the run's evaluations: a pruned trial's metrics and checkpoint end at the step it
  was pruned; a trial is pruned (study, result.json) or complete, never both."""
  workdir = str(tmp_path)
  rows = sweep.run_study(tiny(), workdir, params("optimizer.learning_rate=loguniform(1e-5,1)"),
                         search="random", prune="asha", trials=6, seed=1, metric="loss")
  study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{workdir}/study.db")
  states = {t.number: t.state.name for t in study.trials}
  assert "PRUNED" in states.values() and "COMPLETE" in states.values()
  for row in rows:
    run = os.path.join(workdir, row["workdir"])
    last = max(r["step"] for r in read_metrics(run))
    checkpoints = sorted(int(s) for s in os.listdir(os.path.join(run, "checkpoints"))
                         if s.isdigit())
    pruned = states[row["trial"]] == "PRUNED"
    assert row["status"].startswith("pruned") == pruned
    assert row["status"] == "ok" or pruned
    if pruned:
      step = int(row["status"].rsplit(" ", 1)[1])
      assert last == checkpoints[-1] == step < 12
      assert study.trials[row["trial"]].intermediate_values[step] == row["loss"]
    else:
      assert last == 12 and study.trials[row["trial"]].value == row["loss"]


def test_sigterm_hands_the_trial_back_and_its_retry_resumes_bit_identical(tmp_path, monkeypatch):
  """SIGTERM mid-trial (the loop's own handler): the worker saves, the trial goes back to the
  study at once, and the next worker resumes it from that checkpoint to the metrics of an
  uninterrupted run."""
  workdir, space = str(tmp_path / "sweep"), params("optimizer.learning_rate=loguniform(1e-3,1e-1)")
  reporter = sweep.worker._Run.reporter

  def preempt_at_first_eval(self, trial):
    report = reporter(self, trial)

    def on_eval(step, metrics):
      if trial.number == 0:
        os.kill(os.getpid(), signal.SIGTERM)
      return report(step, metrics)
    return on_eval
  monkeypatch.setattr(sweep.worker._Run, "reporter", preempt_at_first_eval)
  with pytest.raises(deepflow.train.Preempted, match="preempted at step 4"):
    sweep.run_study(tiny(), workdir, space, search="random", prune="median", trials=1)
  study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{workdir}/study.db")
  assert [(t.state.name, t.system_attrs.get("failed_trial")) for t in study.trials] == [
      ("FAIL", None), ("WAITING", 0)]
  monkeypatch.undo()
  rows = sweep.run_study(tiny(), workdir, space, search="random", prune="median", trials=1)
  evals = [r["step"] for r in read_metrics(os.path.join(workdir, "trial_000"))
           if r["split"] == "test"]
  assert [r["trial"] for r in rows] == [0] and evals == [3, 6, 9, 12]  # resumed at step 4
  point = json.load(open(os.path.join(workdir, "trial_000", "trial.json")))["overrides"]
  alone = deepflow.train_and_evaluate(sweep.trial_config(tiny(), point), str(tmp_path / "alone"))
  assert rows[0]["status"] == "ok" and {k: rows[0][k] for k in alone} == alone


def test_a_pruned_population_member_stops_updating(tmp_path):
  configs = [sweep.trial_config(tiny(), [f"optimizer.learning_rate={lr}"]) for lr in (1e-2, 3e-2)]
  dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
  seen = []

  def on_eval(step, live):
    seen.append((step, sorted(live)))
    return {1} if step == 6 else set()
  state, results = sweep.train_population(configs, dirs, on_eval=on_eval)
  assert seen == [(3, [0, 1]), (6, [0, 1]), (9, [0])]
  assert np.asarray(jax.device_get(state.step)).tolist() == [12, 6]
  assert results[1]["status"] == "pruned at step 6"
  assert max(r["step"] for r in read_metrics(dirs[1])) == 6
  _, alone = sweep.train_population(configs[:1], dirs[:1])  # member 0 is unaffected
  assert results[0] == alone[0]


def test_workers_share_a_postgres_study_and_a_killed_trial_resumes(tmp_path, postgres_url):
  """Three workers started together on one PostgreSQL study; one is SIGKILLed mid-trial: its trial is retried by
  another worker from its checkpoint and ends with the metrics of an uninterrupted run; every
  other trial runs once, and the study's best is the best of the trials' own metrics.jsonl."""
  experiment = helpers.write_experiment(tmp_path / "tiny.py", helpers.TINY_EXPERIMENT.replace(
      "c.train.steps = 6", "c.train.steps = 200"))
  workdir = tmp_path / "sweep"
  every = ["--config.train.progress=false", "--config.train.eval_every=50",
           "--config.train.checkpoint_every=50", "--config.train.log_every=10"]
  args = ["sweep", f"--config={experiment}", f"--workdir={workdir}", "--search=random",
          "--sweep=optimizer.learning_rate=loguniform(1e-3,1e-1)", "--trials=5",
          "--metric=loss", f"--storage={postgres_url}", "--study=shared", "--heartbeat=1", *every]
  workers = [helpers.deepflow_process(*args) for _ in range(3)]  # together: they race to create
  victim = _pid_mid_trial(workdir, [w.pid for w in workers])
  os.kill(victim, signal.SIGKILL)
  outputs = [w.communicate(timeout=240) for w in workers]
  for worker, (out, err) in zip(workers, outputs):
    assert worker.returncode == (-signal.SIGKILL if worker.pid == victim else 0), err

  study = optuna.load_study(study_name="shared", storage=postgres_url.replace(
      "postgresql://", "postgresql+psycopg://"))
  fresh = [t for t in study.trials if "failed_trial" not in t.system_attrs
           and not t.user_attrs.get("surplus")]
  retries = [t for t in study.trials if "failed_trial" in t.system_attrs]
  assert len(fresh) == 5 and len(retries) == 1
  killed = retries[0].system_attrs["failed_trial"]
  assert study.trials[killed].state.name == "FAIL" and retries[0].state.name == "COMPLETE"
  assert len({t.params["optimizer.learning_rate"] for t in fresh}) == 5
  finals = {}
  for t in fresh:
    evals = [r for r in read_metrics(str(workdir / f"trial_{t.number:03d}"))
             if r["split"] == "test"]
    steps = [r["step"] for r in evals]
    # Trained once; the killed one resumed from its checkpoint (its first evaluation not redone).
    assert steps == [50, 100, 150, 200] if t.number != killed else steps.count(50) == 1
    finals[t.number] = evals[-1]["loss"]
  assert study.best_value == min(finals.values())

  # The retried trial ends where the same trial trained without interruption ends.
  overrides = json.loads((workdir / f"trial_{killed:03d}" / "trial.json").read_text())
  alone = tmp_path / "alone"
  out = helpers.deepflow_cli("train", f"--config={experiment}", f"--workdir={alone}", *every,
                             *(f"--config.{o}" for o in overrides["overrides"]))
  assert out.returncode == 0, out.stderr
  expected = [r for r in read_metrics(str(alone)) if r["split"] == "test"][-1]
  result = json.loads((workdir / f"trial_{killed:03d}" / "result.json").read_text())
  assert result["status"] == "ok" and result["metrics"] == {
      k: v for k, v in expected.items() if k not in ("step", "split")}

  summary = sweep.study_summary(None, postgres_url, "shared")  # --report, from any machine
  assert summary.startswith("study 'shared': 5 complete, ") and "by loss (min)" in summary


def _pid_mid_trial(workdir, pids, timeout: float = 120) -> int:
  """The pid of a worker holding a trial that has a checkpoint and no result yet."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    for run in sorted(workdir.glob("trial_*")):
      checkpoints = run / "checkpoints"
      if (run / "result.json").exists() or not checkpoints.exists() or not any(
          p.name.isdigit() for p in checkpoints.iterdir()):
        continue
      try:
        pid = json.loads((run / "run.lock").read_text()).get("pid")
      except (OSError, ValueError):
        continue
      if pid in pids:
        return pid
    time.sleep(0.05)
  raise AssertionError("no worker was caught mid-trial")


@pytest.mark.parametrize("args, message", [
    (["--search=annealing", "--sweep=seed=0,1"], "unknown --search 'annealing'"),
    (["--report"], "no study in"),
])
def test_cli_one_line_errors(tmp_path, args, message):
  experiment = helpers.write_experiment(tmp_path / "tiny.py")
  out = helpers.deepflow_cli("sweep", f"--config={experiment}", f"--workdir={tmp_path / 'sweep'}",
                             *args, timeout=60)
  assert message in helpers.one_line_error(out) and not (tmp_path / "sweep").exists()
