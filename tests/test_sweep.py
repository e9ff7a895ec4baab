"""Sweeps: parsing, grid and random trials, sequential trials that resume and skip, and the
vectorized population, whose every member equals the same trial trained alone."""
import csv
import json
import os
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

import deepflow
from deepflow import sweep
from deepflow.registry import ConfigError
from deepflow.train import NonFiniteLossError, checkpoint as checkpoint_lib
from deepflow.train.experiment import Experiment
from deepflow.train.writers import read_metrics
from tests.helpers import experiment_text, tiny_config


def test_parse_axis():
  assert sweep.parse_axis("optimizer.learning_rate=1e-4,1e-3").values == (1e-4, 1e-3)
  assert sweep.parse_axis("model.hidden=(64, 64),(128,)").values == ((64, 64), (128,))
  assert sweep.parse_axis("optimizer.name=adam,sgd").values == ("adam", "sgd")
  axis = sweep.parse_axis("optimizer.learning_rate=loguniform(1e-4, 1e-2)")
  assert (axis.distribution, axis.low, axis.high) == ("loguniform", 1e-4, 1e-2)
  for bad in ("learning_rate", "a=1,,2", "a=loguniform(0,1)"):
    with pytest.raises(ConfigError):
      sweep.parse_axis(bad)


def test_grid_and_random_trials():
  axes = [sweep.parse_axis("a=1,2,3"), sweep.parse_axis("b=0,0.5")]
  grid = sweep.make_trials(axes)
  assert grid == [{"a": a, "b": b} for a in (1, 2, 3) for b in (0, 0.5)]
  ranged = axes + [sweep.parse_axis("c=loguniform(1e-3,1e-1)"), sweep.parse_axis("d=randint(1,4)")]
  draws = sweep.make_trials(ranged, trials=20, seed=3)
  assert draws == sweep.make_trials(ranged, trials=20, seed=3)  # a rerun finds the same trials
  assert all(1e-3 <= t["c"] <= 1e-1 and t["d"] in (1, 2, 3, 4) and t["a"] in (1, 2, 3)
             for t in draws)
  assert len({t["c"] for t in draws}) == 20
  with pytest.raises(ConfigError, match="random search"):
    sweep.make_trials(ranged)


def sweep_config(**train):
  """The tiny experiment for 20 steps of batches of 64, evaluated every 10; ``train`` options
  replace those of the ``train`` section."""
  train = {"steps": 20, "eval_every": 10, "log_every": 10, **train}
  return tiny_config(data__batch_size=64, **{f"train__{k}": v for k, v in train.items()})


def test_sequential_sweep_writes_results_and_skips_finished_trials(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  axes = [sweep.parse_axis("optimizer.learning_rate=1e-3,3e-2")]
  rows = sweep.run_sweep(sweep_config(), workdir, axes)
  assert [r["trial"] for r in rows] == [1, 0]  # the larger rate learns more in 20 steps
  with open(os.path.join(workdir, "results.csv")) as f:
    table = list(csv.DictReader(f))
  assert [float(r["optimizer.learning_rate"]) for r in table] == [3e-2, 1e-3]
  for i in range(2):
    run = os.path.join(workdir, f"trial_{i:03d}")
    with open(os.path.join(run, "result.json")) as f:
      metrics = json.load(f)["metrics"]
    last = [r for r in read_metrics(run) if r["split"] == "test"][-1]
    assert last["step"] == 20 and metrics["accuracy"] == last["accuracy"]
  assert "| 1 | 1 | 0.03 |" in open(os.path.join(workdir, "results.md")).read()
  assert os.path.getsize(os.path.join(workdir, "results.png")) > 0

  def fail(*args, **kwargs):
    raise AssertionError("a finished trial was trained again")
  monkeypatch.setattr(deepflow, "train_and_evaluate", fail)
  assert sweep.run_sweep(sweep_config(), workdir, axes) == rows
  with pytest.raises(ConfigError, match="different sweep"):
    sweep.run_sweep(sweep_config(), workdir, [sweep.parse_axis("optimizer.learning_rate=0.5")])


def test_vectorized_members_equal_their_trials_trained_alone(tmp_path):
  base = sweep_config(steps=30)
  points = sweep.make_trials([sweep.parse_axis("optimizer.learning_rate=2e-3,1e-2"),
                              sweep.parse_axis("model.dropout=0,0.3"),
                              sweep.parse_axis("optimizer.weight_decay=0,0.1"),
                              sweep.parse_axis("seed=0,1")])
  configs = [sweep.trial_config(base, ["optimizer.name='adamw'", *sweep.overrides_of(p)])
             for p in points]
  dirs = [str(tmp_path / f"member_{i}") for i in range(len(points))]
  for d in dirs:
    os.makedirs(d)
  state, results = sweep.train_population(configs, dirs)
  metrics = [r["metrics"] for r in results]
  assert len(metrics) == len(points) == 16
  for i in (5, 15):  # lr 2e-3, dropout 0.3, decay 0, seed 1; and every option at its second value
    alone = str(tmp_path / f"alone_{i}")
    expected = deepflow.train_and_evaluate(configs[i], alone)
    exp = Experiment(configs[i], alone)
    trained, _, _ = exp.restore(checkpoint_lib.Checkpointer(alone, read_only=True))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
                 jax.tree.map(lambda x: x[i], state.params), trained.params)
    assert metrics[i] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    member_log = [r for r in read_metrics(dirs[i]) if r["split"] == "train"]
    alone_log = [r for r in read_metrics(alone) if r["split"] == "train"]
    assert [r["loss"] for r in member_log] == pytest.approx([r["loss"] for r in alone_log],
                                                            rel=1e-4)
  assert len({round(m["loss"], 5) for m in metrics}) == 16  # every member trained differently


def test_a_study_s_rounds_share_one_program(tmp_path):
  """Populations of one experiment with the same swept keys (a study's rounds) reuse one program:
  the next round neither retraces its step nor rebuilds its data, and trains what a program
  built afresh for it trains. A key given in ``keys`` is swept even where the members agree."""
  from deepflow.sweep import population as population_lib
  keys = ["model.dropout", "optimizer.learning_rate"]

  def members(*rates):
    return [sweep.trial_config(sweep_config(), [f"optimizer.learning_rate={lr}",
                                                "model.dropout=0.1"]) for lr in rates]

  def train(configs, name):
    dirs = [str(tmp_path / f"{name}_{i}") for i in range(len(configs))]
    _, results = sweep.train_population(configs, dirs, keys=keys)
    return results
  train(members(1e-3, 3e-2), "first")
  program = sweep.Population(members(1e-3, 3e-2), keys).program
  second = sweep.Population(members(2e-3, 1e-2), keys)
  assert second.program is program and sorted(second.hyper) == keys
  again = train(members(2e-3, 1e-2), "second")
  assert program.train_step._cache_size() == program.eval_step._cache_size() == 1
  population_lib._LAST.clear()
  fresh = train(members(2e-3, 1e-2), "fresh")
  assert sweep.Population(members(2e-3, 1e-2), keys).program is not program
  assert again == fresh and again[0]["metrics"] != again[1]["metrics"]


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_diverging_member_fails_as_its_trial_alone_does(tmp_path, policy):
  """The population applies the loop's non-finite policy to each member: the diverging one is
  failed at the step where training it alone stops, the others train on."""
  base = sweep_config(steps=20, log_every=1, eval_every=0, checkpoint_every=0,
                     nonfinite=policy, max_nonfinite=2)
  configs = [sweep.trial_config(base, ["optimizer.name='sgd'", "optimizer.momentum=0.0",
                                       f"optimizer.learning_rate={lr}"]) for lr in (0.1, 1e30)]
  _, results = sweep.train_population(configs, [str(tmp_path / "ok"), str(tmp_path / "bad")])
  with pytest.raises(NonFiniteLossError) as alone:
    deepflow.train_and_evaluate(configs[1], str(tmp_path / "alone"))
  assert results[0]["status"] == "ok" and np.isfinite(results[0]["metrics"]["loss"])
  where = str(alone.value).split("non-finite ", 1)[1].split(";")[0]
  assert results[1] == {"status": f"failed: loss or gradients became non-finite {where}",
                        "metrics": {}}
  failed_at = int(where.split()[2])
  assert max(r["step"] for r in read_metrics(str(tmp_path / "bad"))) == failed_at - 1


def test_vectorize_refuses_keys_that_change_the_program(tmp_path):
  configs = [sweep.trial_config(sweep_config(), [f"model.hidden={h}"]) for h in ("(8,)", "(16,)")]
  with pytest.raises(ConfigError, match="cannot sweep model.hidden"):
    sweep.train_population(configs, [str(tmp_path)] * 2)


def test_vectorize_refuses_autotune_and_checks_xla_options(tmp_path):
  configs = [sweep.trial_config(sweep_config(autotune=True), [f"seed={s}"]) for s in (0, 1)]
  with pytest.raises(ConfigError, match="does not support train.autotune"):
    sweep.train_population(configs, [str(tmp_path)] * 2)
  bad = [sweep.trial_config(sweep_config(xla_options={"no_such_option": 1}), [f"seed={s}"])
         for s in (0, 1)]
  with pytest.raises(ConfigError, match="No such compile option: 'no_such_option'"):
    sweep.train_population(bad, [str(tmp_path)] * 2)


def test_cli_vectorized_sweep(tmp_path):
  experiment = tmp_path / "tiny.py"
  experiment.write_text(experiment_text({"data.source": "synthetic:digits_like",
                                         "model": dict(name="mlp", hidden=(16,)),
                                         "train.steps": 5}))
  workdir = tmp_path / "sweep"
  out = subprocess.run(
      [sys.executable, "-m", "deepflow", "sweep", f"--config={experiment}", f"--workdir={workdir}",
       "--sweep=optimizer.learning_rate=1e-3,1e-2", "--vectorize", "--metric=loss",
       "--config.train.progress=false"], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "Sweep ranked by loss (min)" in out.stdout and "2 trials" in out.stdout
  assert (workdir / "results.csv").exists() and (workdir / "trial_001" / "result.json").exists()


def test_a_plot_of_sampled_values_labels_them_short(tmp_path):
  """Sampled floats (a study's) are labelled to 4 significant digits, so 16 trials of three
  keys still fit the figure (their full digits made matplotlib give up its layout)."""
  rng = np.random.default_rng(0)
  keys = ["optimizer.learning_rate", "optimizer.weight_decay", "model.dropout"]
  rows = [{**{k: float(v) for k, v in zip(keys, 10 ** rng.uniform(-5, -1, 3))},
           "accuracy": float(a), "status": "ok", "trial": i}
          for i, a in enumerate(rng.uniform(0.1, 1, 16))]
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # "Tight layout not applied" is a UserWarning
    sweep.plot(rows, keys, "accuracy", "max", str(tmp_path / "results.png"))
  assert os.path.getsize(tmp_path / "results.png") > 0


def test_seed_means_table():
  results = {"a/seed0": {"test": {"accuracy": 0.5, "epsilon": 1.0}},
             "a/seed1": {"test": {"accuracy": 0.7, "epsilon": 3.0}},
             "b/seed0": {"test": {"accuracy": 0.9}}, "b/seed1": {"test": {"accuracy": 1.0}}}
  table = sweep.seed_means_table(results, ["a", "b"], 2, ["accuracy", "epsilon"],
                                 first_column="variant").splitlines()
  assert table[0] == "| variant | accuracy | epsilon |  (test split, mean of 2 seeds)"
  assert table[2:] == ["| a | 0.6000 | 2.0000 |", "| b | 0.9500 | - |"]
  once = {"a": {"test": {"accuracy": 0.25}}}
  assert sweep.seed_means_table(once, ["a"], None, ["accuracy"], first_column="v").splitlines()[
      2] == "| a | 0.2500 |"
