"""Writes tests/fixtures/hf_vision/<name>/, once: small random-initialised Hugging Face
``ViTForImageClassification`` and ``ResNetForImageClassification`` models saved by
``save_pretrained`` (config.json, model.safetensors) and ``reference.npz``: a few NHWC
``images`` and the eval-mode ``logits`` transformers computes for them. ``tests/hf/test_vision.py``
loads the weights through ``deepflow.hf.vit`` / ``deepflow.hf.resnet`` and checks deepflow's
logits equal these, with no torch.

    python tools/make_hf_vision_fixtures.py

The configurations cover what the families read: ViT with and without query/key/value biases,
several patch and image sizes, the exact and the tanh GELU, epsilons 1e-12 and 1e-6; ResNet with
basic and bottleneck blocks, ``downsample_in_first_stage`` and ``downsample_in_bottleneck``, odd
and even feature-map sizes (where PyTorch's and flax's stride-2 padding differ), and random
batch-norm statistics and affine parameters.
"""
import json
import os
import shutil

import numpy as np
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "hf_vision")

VIT = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
           image_size=16, patch_size=4, num_labels=5)
RESNET = dict(embedding_size=2, depths=[2, 1, 1], hidden_sizes=[8, 16, 32],
              layer_type="bottleneck", num_labels=5)
CONFIGS = {  # name: (family, config overrides, image size)
    "vit_base_layout": ("vit", {}, 16),
    "vit_no_qkv_bias": ("vit", dict(qkv_bias=False, patch_size=8, image_size=24,
                                    hidden_size=12, num_attention_heads=3, num_labels=3), 24),
    "vit_tanh_gelu": ("vit", dict(hidden_act="gelu_new", layer_norm_eps=1e-6, patch_size=2,
                                  image_size=8, num_hidden_layers=3), 8),
    "resnet_bottleneck": ("resnet", {}, 30),
    "resnet_bottleneck_v1": ("resnet", dict(downsample_in_bottleneck=True,
                                            downsample_in_first_stage=True, depths=[1, 2],
                                            hidden_sizes=[8, 16]), 32),
    "resnet_basic": ("resnet", dict(layer_type="basic", embedding_size=4, depths=[2, 2, 1],
                                    hidden_sizes=[4, 8, 16]), 28),
}


def reference(family: str, overrides: dict, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
  """A random-initialised model in eval mode, with every parameter and batch-norm statistic
  drawn so none is at its trivial initial value (zero biases, unit variances): normal of
  ``std`` about 0 (about 1 for norms' scales); ResNet's conv kernels keep their He init."""
  torch.manual_seed(seed)
  if family == "vit":
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**{**VIT, **overrides}))
  else:
    model = transformers.ResNetForImageClassification(
        transformers.ResNetConfig(**{**RESNET, **overrides}))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if family == "vit" or not name.endswith("convolution.weight"):
        p.normal_(0.0 if not name.endswith("weight") or p.ndim > 1 else 1.0, std)
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0.0, 0.5)
        m.running_var.uniform_(0.5, 2.0)
  return model.eval()


def logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
  """The reference's logits for NHWC images (it takes NCHW ``pixel_values``)."""
  with torch.no_grad():
    pixels = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    return model(pixel_values=pixels).logits.numpy()


def main():
  shutil.rmtree(OUT, ignore_errors=True)
  for i, (name, (family, overrides, size)) in enumerate(CONFIGS.items()):
    model = reference(family, overrides, seed=i)
    images = np.random.default_rng(i).normal(size=(3, size, size, 3)).astype(np.float32)
    out = os.path.join(OUT, name)
    model.save_pretrained(out)
    np.savez(os.path.join(out, "reference.npz"), images=images, logits=logits(model, images))
    with open(os.path.join(out, "config.json")) as f:
      print(name, json.load(f)["architectures"], sum(
          os.path.getsize(os.path.join(out, n)) for n in os.listdir(out)), "bytes")


if __name__ == "__main__":
  main()
