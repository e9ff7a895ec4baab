"""Transfer learning with scarce labels: the SimCLR-pretrained digits encoder
(``experiments/digits_simclr.py``, trained without labels) fine-tuned on 10% of the digits
labels (``data.train_split='train[:10%]'``, 144 images), against the same network trained from
scratch on the same 144.

Run:      deepflow train --config experiments/digits_finetune.py --workdir runs/digits_finetune
          (needs the pretrained run in runs/digits_simclr: ``model.init_from``)
Compare:  python experiments/digits_finetune.py --workdir runs/digits_finetune [KEY=VALUE ...]
          (pretrains runs/digits_simclr first if it is missing, then fine-tunes and trains from
          scratch for each seed and prints test accuracies)
Sweep:    deepflow sweep --config experiments/digits_finetune.py --workdir runs/finetune_lr \\
              --sweep optimizer.learning_rate=3e-4,1e-3,3e-3
          (every trial starts from the same pretrained weights)

The network is ``encoder_cnn``: ``contrastive_cnn``'s backbone under the same parameter names
(``backbone/...``, batch statistics included) and a new 10-class ``head``; ``model.init_skip``
leaves the head fresh and ignores the pretrained projection head (``hidden``, ``projection``).

Result: see the README ("Starting from trained weights"), measured with ``main``.
"""
from deepflow.config import base_config

PRETRAINED = "runs/digits_simclr"


def get_config():
  config = base_config()
  config.task.name = "classification"
  config.model = dict(name="encoder_cnn", widths=(32, 64), init_from=PRETRAINED,
                      init_skip=r"^params/(head|hidden|projection)/")
  config.data.source = "bundled:digits"
  config.data.train_split = "train[:10%]"   # 144 labelled images
  config.data.batch_size = 32
  config.data.eval_batch_size = 120
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "cosine"
  config.optimizer.weight_decay = 1e-4
  config.train.steps = 300
  config.train.eval_every = 0
  config.train.log_every = 50
  config.train.checkpoint_every = 0
  return config


def main(argv=None) -> dict[str, list[float]]:
  """Fine-tunes the pretrained encoder and trains from scratch, once per seed; prints a table
  and returns {start: [test accuracy per seed]}."""
  import argparse
  import os
  import numpy as np
  import deepflow
  parser = argparse.ArgumentParser(description="SimCLR fine-tuning vs scratch on 10% labels")
  parser.add_argument("--workdir", default="runs/digits_finetune")
  parser.add_argument("--pretrained", default=PRETRAINED)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--pretrain", action="append", default=[],
                      help="KEY=VALUE override of digits_simclr, if it must be trained")
  parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
  args = parser.parse_args(argv)
  here = os.path.dirname(os.path.abspath(__file__))
  if not os.path.exists(os.path.join(args.pretrained, "config.json")):
    simclr = deepflow.load_config(os.path.join(here, "digits_simclr.py"), args.pretrain)
    deepflow.train_and_evaluate(simclr, args.pretrained)
  results: dict[str, list[float]] = {"SimCLR-pretrained": [], "from scratch": []}
  for seed in [int(s) for s in args.seeds.split(",")]:
    for name, source in (("SimCLR-pretrained", args.pretrained), ("from scratch", "")):
      config = deepflow.load_config(os.path.abspath(__file__), [
          f"seed={seed}", f"model.init_from={source}", *args.overrides])
      run = os.path.join(args.workdir, f"{'pretrained' if source else 'scratch'}_seed{seed}")
      results[name].append(deepflow.train_and_evaluate(config, run)["accuracy"])
  print("| start | test accuracy per seed | mean |")
  print("|---|---|---|")
  for name, accuracies in results.items():
    print(f"| {name} | {', '.join(f'{a:.4f}' for a in accuracies)} | "
          f"{np.mean(accuracies):.4f} |")
  return results


if __name__ == "__main__":
  main()
