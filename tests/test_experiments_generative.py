"""The generative and self-supervised experiments: each config validates, and each script runs end
to end for a few steps on tiny networks (DCGAN: train, eval with the reference classifier, a
sample grid through ``deepflow sample``; SimCLR: train, then the linear-probe table)."""
import json
import os
import subprocess
import sys

import pytest

import deepflow
from tests.helpers import deepflow_cli, experiment, subprocess_environment, tiny

@pytest.mark.parametrize("name", ["digits_dcgan", "digits_simclr"])
def test_config_validates(name):
  path, _ = experiment(name)
  config = deepflow.load_config(path)
  assert config.task.name in ("gan", "contrastive")


def test_digits_dcgan_runs(data_dir, tmp_path):
  _, module = experiment("digits_dcgan")
  workdir = str(tmp_path / "dcgan")
  metrics = module.main(["--workdir", workdir, "--per_class", "2", *tiny(data_dir),
                         "model.features=8", "task.reference_steps=20"])
  assert {"sample_accuracy", "real_accuracy", "frechet_distance", "real_frechet_distance",
          "d_accuracy"} <= set(metrics)
  assert os.path.getsize(os.path.join(workdir, "samples", "samples.png")) > 0
  # the sampling command a user runs on the same workdir
  result = deepflow_cli("sample", "--workdir", workdir, "--num", "6", "--prompt", "2,5")
  assert result.returncode == 0, result.stderr
  assert "samples.png" in result.stdout


def test_digits_simclr_runs(data_dir, tmp_path):
  """On one device in a subprocess, like the probe test in tests/tasks/test_contrastive.py (its
  probe loop never reads a result between steps)."""
  script = ("import json, sys; from tests.helpers import experiment; "
            "print(json.dumps(experiment('digits_simclr')[1].main(sys.argv[1:]), default=float))")
  env = subprocess_environment(devices=1)
  out = subprocess.run([sys.executable, "-c", script, "--workdir", str(tmp_path),
                        *tiny(data_dir), "model.widths=(8, 16)", "model.projection_hidden=16",
                        "model.projection_dim=8"], env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(results) == {"trained", "random init", "raw pixels"}
  # Ten classes (chance 0.1); measured: raw pixels 0.97, the encoders' probes 0.59-0.71.
  assert results["raw pixels"]["probe (train -> test)"] > 0.8
  for row in results.values():
    assert all(accuracy > 0.35 for accuracy in row.values()), row
