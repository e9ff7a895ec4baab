"""ViT-B/16 on ImageNet-sized images (Dosovitskiy et al., 2021): 224x224x3 inputs cut into
16x16 patches (196 tokens and a class token), 12 pre-LN blocks of width 768 with 12 heads and an
MLP of 3072 (86.6 M parameters), 1000 classes; DeiT's optimisation recipe (Touvron et al.,
2021): AdamW at 1e-3 for a global batch of 1024, weight decay 0.05, 5 warmup epochs then cosine
decay over 300 epochs, label smoothing 0.1, mixup 0.8; bf16 compute, ``nn.scan`` over the blocks
and ``dots_saveable`` rematerialization.

The data here is ``synthetic:imagenet_like`` (ImageNet's shapes, generated; nothing to
download), so the file plans and runs anywhere. For the real run, point ``data.source`` at a
prepared ``tfds:imagenet2012`` and list the ImageNet image transforms (decode, random resized
crop to 224, horizontal flip, normalization) that experiments/imagenet_resnet50.py uses.
Expected from the literature, not measured here: 77.9% top-1 for ViT-B/16 trained on
ImageNet-1k alone with the original recipe (Dosovitskiy et al., 2021); 81.8% with DeiT's full
recipe, which adds RandAugment, CutMix and random erasing (Touvron et al., 2021).

Plan:   deepflow plan --config experiments/imagenet_vit_b16.py --topology v5e:2x4
Run:    deepflow train --config experiments/imagenet_vit_b16.py --workdir runs/imagenet_vit_b16
        on a TPU slice (v5e-8 as planned below: 10.68 GiB per chip) or several GPUs. On one
        device the global batch of 1024 needs 119 GiB for its train step: on a CPU machine
        ``deepflow train`` says so before it starts and names the largest batch that fits (134
        on a 2-core x86_64 CPU machine with 17.0 GiB available).

Planned, not trained (``deepflow plan --nosearch_batch``, compiled for TPU v5e-8 (v5e:2x4) on
a 2-core CPU machine with libtpu 0.0.42, jax 0.10.2): 86,567,656 parameters; data parallel over
8 chips, global batch 1024 (128 images of 197 tokens per chip); per chip 0.32 GiB parameters,
0.65 GiB AdamW state, 9.69 GiB activations/temporaries, peak 10.68 GiB of 16: fits, 5.32 GiB
free. XLA counts 1.36e13 FLOPs per chip per step (6 x parameters x tokens would be 1.31e13) and
1.6e11 bytes accessed: a roofline step of 195 ms, memory-bound by that byte count (compute alone
69 ms), an MFU bound of 35%; an epoch (1251 steps) at that bound is about 4 minutes.
``plan --remat_policies`` (train step, per chip): no rematerialization ('none') does not compile
(the TPU compiler refuses a program far beyond 16 GiB); 'dots_saveable' 9.69 GiB temporaries,
10.68 GiB peak; 'full' and 'nothing_saveable' 1.98 GiB temporaries, 2.97 GiB peak, which would
leave room for a larger batch at the cost of recomputing each block's forward pass.
"""
from deepflow.config import base_config

EPOCH = 1_281_167 // 1024  # ImageNet-1k train images per global batch of 1024


def get_config():
  config = base_config()
  config.model = dict(name="vit", patch_size=16, d_model=768, num_heads=12, num_layers=12,
                      mlp_dim=3072, pooling="cls", dropout=0.0, scan_layers=True,
                      remat_policy="dots_saveable")
  config.data.source = "synthetic:imagenet_like"
  config.data.transforms = []
  config.data.batch_size = 1024
  config.data.eval_batch_size = 1024
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 5 * EPOCH
  config.optimizer.weight_decay = 0.05
  config.optimizer.clip_norm = 1.0
  config.regularizers = [dict(name="label_smoothing", amount=0.1),
                         dict(name="mixup", alpha=0.8)]
  config.train.steps = 300 * EPOCH
  config.train.eval_every = 10 * EPOCH
  config.train.checkpoint_every = 2 * EPOCH
  config.train.compute_dtype = "bfloat16"
  return config
