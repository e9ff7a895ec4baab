"""Real-size experiment files (planned with `deepflow plan`, not trained here): each validates as
written and trains a few steps at a tiny size through overrides."""
import os

import numpy as np
import pytest

import deepflow
from tests.helpers import reference_accuracy


def test_gpt2_small_file_validates_and_trains_at_a_tiny_size(data_dir, tmp_path):
  path = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "gpt2_small.py")
  full = deepflow.load_config(path)
  assert (full.model.d_model, full.model.num_layers, full.model.max_len) == (768, 12, 1024)
  config = deepflow.load_config(path, [
      "model.d_model=32", "model.num_heads=2", "model.num_layers=2", "model.mlp_dim=64",
      "model.max_len=32", "model.vocab_size=0", "data.source='bundled:text/seq_len=32'",
      f"data.data_dir='{data_dir}'", "data.batch_size=8", "data.eval_batch_size=64",
      "data.eval_split=validation", "train.steps=2", "train.eval_every=0",
      "train.checkpoint_every=0", "train.progress=False", "train.compilation_cache=''"])
  metrics = deepflow.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(metrics["perplexity"])


def test_imagenet_vit_b16_file_validates_and_trains_at_a_tiny_size(tmp_path):
  path = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "imagenet_vit_b16.py")
  full = deepflow.load_config(path, num_devices=8)
  assert (full.model.patch_size, full.model.d_model, full.model.num_layers) == (16, 768, 12)
  config = deepflow.load_config(path, [
      "model.d_model=16", "model.num_heads=2", "model.num_layers=1", "model.mlp_dim=32",
      "data.batch_size=8", "data.eval_batch_size=128", "train.steps=2", "train.eval_every=0",
      "train.checkpoint_every=0", "train.progress=False", "train.compilation_cache=''",
      "train.compute_dtype=float32"])  # bfloat16 convolutions are emulated, slowly, on a CPU
  metrics = deepflow.train_and_evaluate(config, str(tmp_path))
  # 1000 classes after 2 steps are not above chance: check against a reference instead.
  assert np.isfinite(metrics["loss"])
  assert metrics["accuracy"] == pytest.approx(reference_accuracy(str(tmp_path)), abs=1e-6)
