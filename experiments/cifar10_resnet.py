"""ResNet-20 on CIFAR-10 (``tfds:cifar10``), the recipe of He et al. (2016, section 4.2): SGD
with momentum 0.9, learning rate 0.1 at batch 128 divided by 10 at 32k and 48k steps, weight
decay 1e-4 (deepflow's is decoupled, added after momentum: about a tenth of the paper's L2
term at momentum 0.9; `regularizers=[dict(name="l2", amount=5e-5)]` with weight_decay 0 is the
paper's), 64k steps; 4-pixel random crops and horizontal flips. CIFAR-10 decodes to 150 MB, so
``data.cache='auto'`` holds it in memory.

Prepare (once, where there is network; see README "Preparing a real dataset"):
        deepflow data prepare cifar10 --data_dir ~/tensorflow_datasets
Run:    deepflow train --config experiments/cifar10_resnet.py --workdir runs/cifar10_resnet

Expected from the literature, NOT measured here: about 91.3% test accuracy (He et al., 2016,
Table 6: 8.75% error for ResNet-20). Only a few steps on generated images have run here
(tests/test_experiments_images.py).
"""
from deepflow.config import base_config


def get_config():
  config = base_config()
  config.model = dict(name="resnet", stage_sizes=(3, 3, 3), width=16)
  config.data.source = "tfds:cifar10"
  config.data.transforms = [dict(name="standardize"),
                            dict(name="random_crop", padding=4),
                            dict(name="flip")]
  config.data.batch_size = 128
  config.data.eval_batch_size = 1000
  config.optimizer.name = "sgd"
  config.optimizer.momentum = 0.9
  config.optimizer.learning_rate = 0.1
  config.optimizer.schedule = "piecewise"
  config.optimizer.boundaries = (32000, 48000)
  config.optimizer.decay_rate = 0.1
  config.optimizer.weight_decay = 1e-4
  config.train.steps = 64000
  config.train.eval_every = 2000
  config.train.checkpoint_every = 2000
  return config
