"""Class imbalance, "fraud-like": Wisconsin breast cancer with the malignant class cut to 5% of
the rows (bundled:breast_cancer_rare: train 300 rows / 15 positive, test 76 / 4 positive), an MLP
with or without class weights in the loss. Accuracy alone says little here (always predicting
"benign" scores 94.7%), so the eval reports precision, recall, F1 and ROC-AUC of the rare class.

Run:     deepflow train --config experiments/imbalanced.py --workdir runs/imbalanced
Compare: python experiments/imbalanced.py --workdir runs/imbalanced
         (no weights, 1:3, and task.class_weights='balanced' = 0.53:10 from the train counts)

Result (measured on 2 shared CPU cores, 500 steps of batch 64, mean of seeds 0-2, ~1.5 min for
the comparison; test split: 76 rows, 4 positive, so recall moves in steps of 0.25 and precision
in coarse steps too: read it as a demonstration of the metrics more than as a benchmark):

| class weights | accuracy | precision | recall | F1 | ROC-AUC |
|---|---|---|---|---|---|
| none (this config) | 0.9781 | 0.8333 | 0.7500 | 0.7857 | 0.9595 |
| 1 : 3 | 0.9649 | 0.7262 | 0.7500 | 0.7175 | 0.9688 |
| balanced (0.53 : 10) | 0.9386 | 0.5040 | 0.7500 | 0.5857 | 0.9734 |

Every model finds the same 3 of the 4 test positives; weighting the rare class raises its
scores overall (AUC up slightly) but, at the 0.5 threshold, buys only false alarms here
(precision and F1 fall). Accuracy stays above the 94.7% of always answering "benign" in every
row, which is why it is the wrong metric to compare these on.
"""
from deepflow.config import base_config

VARIANTS = {
    "unweighted": [],  # get_config() itself
    "weights_1_3": ["task.class_weights=[1.0, 3.0]"],
    "balanced": ["task.class_weights='balanced'"],
}


def get_config():
  config = base_config()
  config.data.source = "bundled:breast_cancer_rare"
  config.data.batch_size = 64
  config.data.eval_batch_size = 64
  config.data.transforms = [dict(name="standardize")]
  config.task = dict(name="classification", class_weights=None)
  config.model = dict(name="mlp", hidden=(64, 64), dropout=0.2)
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 0.01
  config.train.steps = 500
  config.train.eval_every = 0
  config.train.log_every = 100
  config.train.checkpoint_every = 0
  return config


def main(argv=None):
  """The comparison above: every variant, mean over seeds (``deepflow.sweep.compare``)."""
  from deepflow.sweep import compare
  return compare(__file__, VARIANTS, argv, description="unweighted vs balanced class weights",
                 workdir="runs/imbalanced", keys=("accuracy", "precision", "recall", "f1", "auc"),
                 first_column="class weights")


if __name__ == "__main__":
  main()
