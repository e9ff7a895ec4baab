"""The image experiments at real scale (CIFAR-10 ResNet-20, ImageNet ResNet-50) as written, and
a few steps of each on generated JPEGs with tiny widths and small images."""
import os

import numpy as np
import pytest

import deepflow
from tests.helpers import reference_accuracy

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, "experiments")


@pytest.mark.parametrize("name, smaller", [
    ("cifar10_resnet", ["model.stage_sizes=(1, 1)", "model.width=4"]),
    ("imagenet_resnet50", [
        "model.stage_sizes=(1, 1)", "model.width=2", "data.eval_split=test",
        "data.transforms=[{'name': 'random_resized_crop', 'size': 12}, {'name': 'flip'}, "
        "{'name': 'standardize'}]", "data.workers=0", "train.compute_dtype=float32"]),
])
def test_image_experiment_runs_on_generated_jpegs(name, smaller, image_data_dir, tmp_path):
  path = os.path.join(ROOT, f"{name}.py")
  written = deepflow.load_config(path)  # the file as written validates
  assert written.data.source.startswith("tfds:")
  config = deepflow.load_config(path, [
      "data.source=tfds:gen_jpeg", f"data.data_dir={image_data_dir}", "data.batch_size=32",
      "data.eval_batch_size=64", "train.steps=2", "train.log_every=1", "train.eval_every=0",
      "train.checkpoint_every=0", "train.progress=False", "optimizer.warmup_steps=1",
      *smaller])
  metrics = deepflow.train_and_evaluate(config, str(tmp_path))
  # Tiny ResNets are at chance after 2 steps (and still after 12): check against a reference.
  assert np.isfinite(metrics["loss"])
  assert metrics["accuracy"] == pytest.approx(reference_accuracy(str(tmp_path)), abs=1e-6)
  with open(path) as f:
    doc = f.read().split('"""')[1]
  assert f"--config experiments/{name}.py" in doc and "NOT measured here" in doc
