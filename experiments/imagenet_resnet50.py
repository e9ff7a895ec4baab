"""ResNet-50 on ImageNet (``tfds:imagenet2012``, 1.28 M training images), the standard recipe:
random-resized 224x224 crops and horizontal flips for training, resize 256 / centre crop 224
for evaluation (``random_resized_crop``'s eval mode); SGD with momentum 0.9, learning rate
0.1 x batch / 256 with 5 epochs of linear warmup then cosine decay (Goyal et al., 2017;
He et al., 2019), weight decay 1e-4 on kernels only (decoupled here, added after
momentum: about a tenth of the papers' L2 term at momentum 0.9), label smoothing 0.1, 90 epochs, bf16.

ImageNet decodes to ~140 GB: ``data.cache='auto'`` streams it, decoding JPEGs in
``data.workers`` processes; the per-channel statistics come from a 2,000-image sample.

Prepare (once, where there is network and the manually downloaded archives; see README
"Preparing a real dataset"):
        deepflow data prepare imagenet2012 --data_dir ~/tensorflow_datasets \\
            --manual_dir ~/imagenet_tars
Run:    deepflow train --config experiments/imagenet_resnet50.py --workdir runs/resnet50
        on a TPU slice (v5e-8 as planned below: 5.64 GiB per chip) or several GPUs. On one
        device the global batch of 1024 needs 143 GiB for its train step: on a CPU machine
        ``deepflow train`` says so before it starts and names the largest batch that fits (126
        on a 2-core x86_64 CPU machine with 18.0 GiB available); without a prepared
        ``tfds:imagenet2012`` it says that first.

Planned, not trained (``deepflow plan --topology v5e:2x4 --nosearch_batch
--config.data.source=synthetic:imagenet_like``, TPU v5e-8 compiled through libtpu on a CPU machine):
25,557,032 parameters; per chip 0.095 GiB parameters, 0.095 GiB momentum, 5.38 GiB activations
and temporaries, peak 5.64 GiB of 16: fits, 10.36 GiB free; 3.09e12 FLOPs per chip-step;
roofline 74 ms per step (memory-bound, compute alone 15.7 ms), MFU at most 21%.

Expected from the literature, NOT measured here: about 76-77% top-1 single-crop validation
accuracy (Goyal et al., 2017: 76.3% at 90 epochs; label smoothing and cosine decay add a few
tenths, He et al., 2019). Only a few steps on small generated images have run here
(tests/test_experiments_images.py).
"""
from deepflow.config import base_config

TRAIN_IMAGES = 1_281_167
BATCH = 1024
EPOCH = TRAIN_IMAGES // BATCH


def get_config():
  config = base_config()
  config.model = dict(name="resnet", stage_sizes=(3, 4, 6, 3), width=64, block="bottleneck",
                      stem="imagenet")
  config.data.source = "tfds:imagenet2012"
  config.data.eval_split = "validation"
  config.data.transforms = [dict(name="random_resized_crop", size=224),
                            dict(name="flip"),
                            dict(name="standardize")]
  config.data.batch_size = BATCH
  config.data.eval_batch_size = 1000
  config.data.stats_examples = 2000
  config.data.workers = 16
  config.optimizer.name = "sgd"
  config.optimizer.momentum = 0.9
  config.optimizer.learning_rate = 0.1 * BATCH / 256
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 5 * EPOCH
  config.optimizer.weight_decay = 1e-4
  config.regularizers = [dict(name="label_smoothing", amount=0.1)]
  config.train.steps = 90 * EPOCH
  config.train.compute_dtype = "bfloat16"
  config.train.eval_every = 5 * EPOCH
  config.train.checkpoint_every = EPOCH
  return config
