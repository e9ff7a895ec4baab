"""The compilation cache and step profiles, through `deepflow train` as a user runs it."""
import glob
import os

from tests.helpers import deepflow_cli as deepflow, write_experiment


def cache_entries(directory):
  return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def test_compilation_cache_is_filled_then_used(tmp_path):
  experiment = write_experiment(tmp_path / "tiny.py")
  cache = str(tmp_path / "cache")
  args = ("--config", experiment, "--config.train.steps=2", "--config.train.eval_every=0",
          f"--config.train.compilation_cache={cache}")
  first = deepflow("train", "--workdir", str(tmp_path / "a"), *args)
  assert first.returncode == 0, first.stderr
  entries = cache_entries(cache)
  assert len(entries) >= 3  # state initialisation, train step, eval step at least
  again = deepflow("train", "--workdir", str(tmp_path / "b"), *args)  # a fresh run, same shapes
  assert again.returncode == 0, again.stderr
  assert cache_entries(cache) == entries  # everything came from the cache
  off = deepflow("train", "--workdir", str(tmp_path / "c"), *args[:-1],
                 "--config.train.compilation_cache=")
  assert off.returncode == 0, off.stderr
  assert cache_entries(cache) == entries


def test_profile_steps_write_a_trace(tmp_path):
  experiment = write_experiment(tmp_path / "tiny.py")
  workdir = str(tmp_path / "run")
  out = deepflow("train", "--config", experiment, "--workdir", workdir,
                 "--config.train.steps=5", "--config.train.profile_steps=(2, 4)",
                 "--config.train.eval_every=0", "--config.train.compilation_cache=")
  assert out.returncode == 0, out.stderr
  traces = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 1000
  bad = deepflow("train", "--config", experiment, "--workdir", workdir,
                 "--config.train.profile_steps=(4, 2)")
  assert bad.returncode != 0 and "train.profile_steps must be" in bad.stderr
