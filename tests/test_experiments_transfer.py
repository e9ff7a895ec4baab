"""The transfer-learning experiments at a tiny size: SimCLR fine-tuning vs scratch on 10% of the
labels, LoRA vs full fine-tuning on a second text."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import deepflow
from tests.helpers import experiment, subprocess_environment, tiny


@pytest.mark.parametrize("name", ["digits_finetune", "text_lora"])
def test_config_validates(name):
  config = deepflow.load_config(experiment(name)[0])
  assert config.model.init_from.startswith("runs/")


def test_digits_finetune_runs(data_dir, tmp_path):
  """SimCLR pretraining then the comparison, in a subprocess on one device (the cheapest; the
  steps' parallel form is covered elsewhere), in tmp_path, where the file's relative
  runs/digits_simclr then lies."""
  script = ("import json, sys, deepflow; from tests.helpers import experiment; "
            "pre = deepflow.load_config(experiment('digits_simclr')[0], sys.argv[1:] + "
            "['model.projection_hidden=8', 'model.projection_dim=4', 'train.eval_every=0']); "
            "deepflow.train_and_evaluate(pre, 'runs/digits_simclr'); "
            "print(json.dumps(experiment('digits_finetune')[1].main(['--seeds', '1'] + "
            "sys.argv[1:])))")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = subprocess_environment(
      {"PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}, devices=1)
  out = subprocess.run([sys.executable, "-c", script, *tiny(data_dir, steps=2),
                        "model.widths=(4, 8)"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(results) == {"scratch/seed0", "fine-tuned/seed0", "frozen/seed0"}
  # Ten classes after 2 steps: chance 0.1, a constant guess at most 0.11; measured 0.16-0.18.
  assert all(r["test"]["accuracy"] > 0.13 for r in results.values()), results
  runs = tmp_path / "runs" / "digits_finetune"
  for name, source in (("scratch", ""), ("fine-tuned", "runs/digits_simclr")):
    with open(runs / name / "seed0" / "config.json") as f:
      assert json.load(f)["model"]["init_from"] == source


def test_text_lora_runs(data_dir, tmp_path):
  small = [*tiny(data_dir, steps=2), "model.num_layers=1", "data.eval_split=validation"]
  _, module = experiment("text_lora")
  results = module.main(["--workdir", str(tmp_path / "lora"), "--pretrained",
                         str(tmp_path / "pretrained"), *(f"--pretrain={o}" for o in small),
                         *small])
  lora, full = results["LoRA fine-tuned"], results["fully fine-tuned"]
  # rank 8 on qkv (64 | 192), out (64 | 64), MLP (64 | 256) and (256 | 64) of one block
  assert lora["trainable"] == 8 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
  assert full["trainable"] > 5 * lora["trainable"]
  assert all(np.isfinite(row["perplexity"]) for row in results.values())
