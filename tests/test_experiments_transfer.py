"""The transfer-learning experiments at a tiny size: SimCLR fine-tuning vs scratch on 10% of the
labels, LoRA vs full fine-tuning on a second text."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import deepflow
from tests.helpers import experiment, tiny


@pytest.mark.parametrize("name", ["digits_finetune", "text_lora"])
def test_config_validates(name):
  config = deepflow.load_config(experiment(name)[0])
  assert config.model.init_from.startswith("runs/")


def test_digits_finetune_runs(data_dir, tmp_path):
  """In a subprocess on one device, as the SimCLR experiment's own test (its steps on 8
  simulated CPU devices can deadlock in XLA's CPU collectives)."""
  script = ("import json, sys; from tests.helpers import experiment; "
            "print(json.dumps(experiment('digits_finetune')[1].main(sys.argv[1:])))")
  small = [*tiny(data_dir, steps=2), "model.widths=(4, 8)"]
  pretrain = [*small, "model.projection_hidden=8", "model.projection_dim=4",
              "train.eval_every=0"]
  env = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"].replace("device_count=8",
                                                                    "device_count=1")}
  out = subprocess.run([sys.executable, "-c", script, "--workdir", str(tmp_path / "finetune"),
                        "--pretrained", str(tmp_path / "simclr"), "--seeds", "0",
                        *(f"--pretrain={o}" for o in pretrain), *small],
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(results) == {"SimCLR-pretrained", "from scratch"}
  assert all(0.0 <= a <= 1.0 for row in results.values() for a in row)
  with open(tmp_path / "finetune" / "pretrained_seed0" / "config.json") as f:
    assert json.load(f)["model"]["init_from"] == str(tmp_path / "simclr")


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
