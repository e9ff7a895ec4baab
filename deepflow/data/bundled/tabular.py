"""Small classic tables from scikit-learn (Wisconsin breast cancer, wine) and two variants that
exercise parts of deepflow: missing values (imputation) and a rare positive class (imbalance).
The data ships inside scikit-learn, so preparing it needs no network."""
from __future__ import annotations

import numpy as np

from deepflow.data.bundled.base import Table, TableBuilder, register_builder

MISSING_FRACTION = 0.1
MISSING_SEED = 0
RARE_POSITIVE_RATE = 0.05
RARE_SEED = 0


def breast_cancer() -> Table:
  """Wisconsin diagnostic breast cancer, 569 x 30; label 1 = malignant (212), 0 = benign (357).

  scikit-learn codes malignant as 0; it is flipped so the positive class is 1, as precision,
  recall and AUC assume."""
  from sklearn.datasets import load_breast_cancer
  data = load_breast_cancer()
  return Table(features=data.data.astype(np.float32), labels=1 - data.target,
               feature_names=list(data.feature_names), class_names=["benign", "malignant"])


def knock_out(features: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """A copy of ``features`` with exactly round(fraction * size) cells, drawn uniformly without
  replacement (numpy ``default_rng(seed)``), set to NaN."""
  out = features.astype(np.float32).copy()
  cells = np.random.default_rng(seed).choice(out.size, round(fraction * out.size), replace=False)
  out.reshape(-1)[cells] = np.nan
  return out


def keep_rare_positives(labels: np.ndarray, rate: float, seed: int) -> np.ndarray:
  """Sorted rows to keep: every negative and round(rate / (1 - rate) * negatives) positives
  drawn without replacement (``default_rng(seed)``), so positives are ``rate`` of the rows."""
  positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
  count = round(rate / (1.0 - rate) * len(negatives))
  chosen = np.random.default_rng(seed).choice(positives, count, replace=False)
  return np.sort(np.concatenate([negatives, chosen]))


@register_builder("breast_cancer")
class DeepflowBreastCancer(TableBuilder):
  """Wisconsin breast cancer: features float32 (30,), label 1 = malignant (212 of 569).

  Split: fixed stratified 80/20 (seed 0): train 455 / test 114."""
  HOMEPAGE = "https://scikit-learn.org/stable/datasets/toy_dataset.html#breast-cancer-dataset"

  def _table(self) -> Table:
    return breast_cancer()


@register_builder("wine")
class DeepflowWine(TableBuilder):
  """Wine recognition: features float32 (13,), label one of 3 cultivars (59 / 71 / 48 of 178).

  Split: fixed stratified 80/20 (seed 0): train 142 / test 36."""
  HOMEPAGE = "https://scikit-learn.org/stable/datasets/toy_dataset.html#wine-dataset"

  def _table(self) -> Table:
    from sklearn.datasets import load_wine
    data = load_wine()
    return Table(features=data.data.astype(np.float32), labels=data.target,
                 feature_names=list(data.feature_names), class_names=list(data.target_names))


@register_builder("breast_cancer_missing")
class DeepflowBreastCancerMissing(TableBuilder):
  """Breast cancer with 10% of the feature values missing (NaN), to exercise imputation.

  Exactly 1,707 of the 569 x 30 cells, drawn uniformly over the whole table with a fixed seed
  (``knock_out``), are NaN before splitting, so both splits hold missing values (about 10% each);
  every other value equals the original. Labels and split as ``breast_cancer`` (train 455 / test
  114). deepflow rejects NaN inputs unless an imputation transform is configured."""
  HOMEPAGE = DeepflowBreastCancer.HOMEPAGE

  def _table(self) -> Table:
    table = breast_cancer()
    table.features = knock_out(table.features, MISSING_FRACTION, MISSING_SEED)
    table.metadata = {"missing_fraction": MISSING_FRACTION, "missing_seed": MISSING_SEED,
                      "missing_values": int(np.isnan(table.features).sum())}
    return table


@register_builder("breast_cancer_rare")
class DeepflowBreastCancerRare(TableBuilder):
  """Breast cancer with the positive (malignant) class made rare, "fraud-like": all 357 benign
  rows and 19 of the 212 malignant ones (fixed seed, ``keep_rare_positives``), 376 rows of which
  5.05% positive. ``row`` is the row in scikit-learn's table.

  Split: fixed stratified 80/20 (seed 0): train 300 (15 positive) / test 76 (4 positive)."""
  HOMEPAGE = DeepflowBreastCancer.HOMEPAGE

  def _table(self) -> Table:
    table = breast_cancer()
    keep = keep_rare_positives(table.labels, RARE_POSITIVE_RATE, RARE_SEED)
    table.features, table.labels, table.rows = table.features[keep], table.labels[keep], keep
    table.metadata = {"positive_rate_target": RARE_POSITIVE_RATE, "rare_seed": RARE_SEED,
                      "positives": int(table.labels.sum()), "rows": len(keep)}
    return table
