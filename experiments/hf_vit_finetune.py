"""Fine-tuning a pretrained Hugging Face ViT (google/vit-base-patch16-224, ImageNet-1k) on
CIFAR-10 (``tfds:cifar10``) with a new 10-class head: every other variable starts from the
checkpoint, the head (``params/head/``) starts fresh, and the log says so.

Get the weights and the data once, on a machine with network (deepflow itself downloads
nothing):

    huggingface-cli download google/vit-base-patch16-224 --local-dir checkpoints/vit-base-patch16-224
    deepflow data prepare cifar10 --data_dir ~/tensorflow_datasets

Run:     deepflow train --config experiments/hf_vit_finetune.py --workdir runs/hf_vit_finetune
Export:  deepflow export --workdir runs/hf_vit_finetune --format hf --out exported/vit_cifar10
         (transformers' AutoModelForImageClassification loads it, with CIFAR-10's 10 labels)

The images are resized to the checkpoint's 224x224 and scaled to [-1, 1]: the checkpoint's
preprocessor_config.json (rescale 1/255, mean 0.5, std 0.5), which ``minmax`` to [-1, 1] equals
on images whose train split spans 0..255. ``--config.model.init_from=hf:checkpoints/resnet-50``
(microsoft/resnet-50; ``minmax`` -> ``standardize``) fine-tunes a ResNet-50 the same way, and
``--config.model.lora.rank=8`` adapts the ViT's attention only. The file as written runs on a
TPU or a GPU (ViT-B/16 at batch 64 needs ~20 GiB per device); on the 2-core CPU only a few steps
with a tiny checkpoint have run (tests/hf/test_vision.py). Literature, NOT measured here: ~98-99%
CIFAR-10 test accuracy after a few thousand steps (Dosovitskiy et al., 2021, Table 2).
"""
from deepflow.config import base_config

CHECKPOINT = "checkpoints/vit-base-patch16-224"


def get_config():
  config = base_config()
  config.model = dict(init_from=f"hf:{CHECKPOINT}", dropout=0.0)
  config.data.source = "tfds:cifar10"
  config.data.transforms = [dict(name="resize", size=(224, 224)), dict(name="flip"),
                            dict(name="minmax", per="global", low=-1.0, high=1.0)]
  config.data.batch_size = 64
  config.data.eval_batch_size = 256
  config.optimizer.name = "sgd"
  config.optimizer.momentum = 0.9
  config.optimizer.learning_rate = 0.01
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 200
  config.optimizer.clip_norm = 1.0
  config.train.compute_dtype = "bfloat16"
  config.train.steps = 5000
  config.train.eval_every = 500
  config.train.checkpoint_every = 500
  return config
