"""deepflow's Hugging Face vision families against transformers itself, at published sizes.

For a ViT-B/16-shaped ``ViTForImageClassification`` and a ResNet-50-shaped
``ResNetForImageClassification`` (random weights; the ResNet's batch-norm statistics those of
other random images, see ``calibrated``; 1000 classes), both
directions on a batch of 2 images of 224x224:

* in: the checkpoint ``save_pretrained`` wrote, read through ``deepflow.hf.<family>``'s rules,
  gives transformers' eval-mode logits (max absolute difference printed, beside the logits'
  largest magnitude and transformers' own float32 error: its logits against the same model run
  in float64);
* out: deepflow's variables written back through the rules (and ``hf_config``), loaded by
  ``transformers.AutoModelForImageClassification.from_pretrained``, give deepflow's logits, with
  no missing or unexpected tensor.

The forward pass of each is timed too (batch 2, f32, median of 3, deepflow jit-compiled
first). Needs torch and transformers; downloads nothing.

    python benchmarks/hf_vision.py
"""
import copy
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np
import torch
import transformers
from flax import traverse_util
from safetensors.numpy import load_file, save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
from make_hf_vision_fixtures import logits, reference  # noqa: E402

from benchmarks.dp_step import machine  # noqa: E402
from deepflow.hf import resnet, vit  # noqa: E402
from deepflow.registry import MODELS  # noqa: E402

CONFIGS = {  # name: (family, transformers config, parameter std of the reference)
    "ViT-B/16": (vit, dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, image_size=224, patch_size=16,
                           num_labels=1000), 0.02),
    "ResNet-50": (resnet, dict(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048],
                               depths=[3, 4, 6, 3], layer_type="bottleneck",
                               num_labels=1000), 0.1),
}


def calibrated(model: torch.nn.Module, images: np.ndarray) -> torch.nn.Module:
  """The model with its batch-norm statistics set to those of ``images`` (one train-mode pass
  with momentum 1), so that 50 layers deep activations stay normalized as in a trained network
  rather than growing through statistics drawn at random."""
  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  for m in norms:
    m.momentum = 1.0
  logits(model.train(), images)
  for m in norms:
    m.momentum = 0.1
  return model.eval()


def float64_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
  """The reference's logits computed in float64 (a copy of the model), to size float32's own
  rounding."""
  with torch.no_grad():
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float64))
    return copy.deepcopy(model).double()(pixel_values=pixels).logits.numpy()


def median_seconds(fn, repeats: int = 3) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def load(family, directory: str):
  """(model, variables) from a save_pretrained directory, through the family's rules."""
  with open(os.path.join(directory, "config.json")) as f:
    config = json.load(f)
  tensors = load_file(os.path.join(directory, "model.safetensors"))
  section = family.model_section(config)
  model = MODELS.get(section.pop("name"))(**section)
  variables = {r.path: r.to_deepflow(tensors[r.hf_name]) for r in family.weight_rules(config)}
  return model, traverse_util.unflatten_dict(variables, sep="/"), config


def export(family, config, variables, directory: str) -> None:
  """config.json and model.safetensors written from deepflow's variables."""
  flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
  tensors = {r.hf_name: np.ascontiguousarray(r.to_hf(np.asarray(flat[r.path])))
             for r in family.weight_rules(config)}
  tensors.update(getattr(family, "fixed_tensors", lambda c: {})(config))
  save_file(tensors, os.path.join(directory, "model.safetensors"))
  section = {**family.model_section(config), "num_channels": config["num_channels"]}
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(family.hf_config(section), f)


def compare(name: str, family, hf_overrides: dict, std: float) -> None:
  torch.set_num_threads(os.cpu_count())
  torch_model = reference(family.MODEL_TYPES[0], hf_overrides, std=std)
  rng = np.random.default_rng(0)
  if family is resnet:  # statistics of other images than those compared
    torch_model = calibrated(torch_model, rng.normal(size=(8, 224, 224, 3)).astype(np.float32))
  images = rng.normal(size=(2, 224, 224, 3)).astype(np.float32)
  expected = logits(torch_model, images)
  rounding = np.abs(expected - float64_logits(torch_model, images)).max()
  with tempfile.TemporaryDirectory() as tmp:
    torch_model.save_pretrained(os.path.join(tmp, "in"))
    model, variables, config = load(family, os.path.join(tmp, "in"))
    apply = jax.jit(model.apply)
    ours = np.asarray(apply(variables, images))
    os.makedirs(os.path.join(tmp, "out"))
    export(family, config, variables, os.path.join(tmp, "out"))
    back, info = transformers.AutoModelForImageClassification.from_pretrained(
        os.path.join(tmp, "out"), output_loading_info=True)
  exported = logits(back.eval(), images)
  t_torch = median_seconds(lambda: logits(torch_model, images))
  t_ours = median_seconds(lambda: jax.block_until_ready(apply(variables, images)))
  problems = {k: v for k, v in info.items() if v}
  print(f"{name}: in max |deepflow - transformers| {np.abs(ours - expected).max():.2e}, "
        f"out max |transformers(export) - deepflow| {np.abs(exported - ours).max():.2e} "
        f"(largest |logit| {np.abs(expected).max():.2f}; transformers f32 vs f64 {rounding:.2e}); "
        f"loading problems: {problems or 'none'}; "
        f"forward batch 2: transformers {t_torch * 1e3:.0f} ms, deepflow {t_ours * 1e3:.0f} ms "
        f"({t_torch / t_ours:.2f}x)")


def main():
  print(machine(), f"torch {torch.__version__}, transformers {transformers.__version__}")
  for name, (family, overrides, std) in CONFIGS.items():
    compare(name, family, overrides, std)
  print("load average", os.getloadavg())


if __name__ == "__main__":
  main()
