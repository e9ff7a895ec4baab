"""Fairness metrics against hand-computed examples and brute-force definitions."""
import math

import numpy as np
import pytest

from deepflow.analysis.fairness import group_metrics, reweighing_weights
from deepflow.registry import ConfigError

# Group 0: labels 1 0 0 1, predictions 1 1 1 1. Group 1: labels 1 0 1 0, predictions 0 0 1 0.
PREDICTIONS = np.array([1, 1, 1, 1, 0, 0, 1, 0])
SCORES = np.array([0.9, 0.7, 0.5, 0.6, 0.1, 0.4, 0.55, 0.2])  # >= 0.5 gives PREDICTIONS
LABELS = np.array([1, 0, 0, 1, 1, 0, 1, 0])
GROUPS = np.array([0, 0, 0, 0, 1, 1, 1, 1])


def test_hand_computed_example():
  m = group_metrics(PREDICTIONS, LABELS, GROUPS)
  expected = {
      "fairness/group_0/count": 4, "fairness/group_0/positives": 2,
      "fairness/group_0/accuracy": 0.5, "fairness/group_0/selection_rate": 1.0,
      "fairness/group_0/tpr": 1.0, "fairness/group_0/fpr": 1.0,
      "fairness/group_1/count": 4, "fairness/group_1/positives": 2,
      "fairness/group_1/accuracy": 0.75, "fairness/group_1/selection_rate": 0.25,
      "fairness/group_1/tpr": 0.5, "fairness/group_1/fpr": 0.0,
      "fairness/accuracy": 0.625, "fairness/selection_rate": 0.625,
      "fairness/demographic_parity_difference": 0.75,
      "fairness/demographic_parity_ratio": 0.25,
      "fairness/equal_opportunity_difference": 0.5,
      "fairness/equalized_odds_difference": 1.0,
  }
  assert m.keys() == expected.keys()
  for key, value in expected.items():
    assert m[key] == pytest.approx(value), key
    assert isinstance(m[key], float)


def test_scores_are_thresholded():
  assert group_metrics(SCORES, LABELS, GROUPS) == group_metrics(PREDICTIONS, LABELS, GROUPS)
  m = group_metrics(SCORES, LABELS, GROUPS, threshold=0.58, prefix="fair")
  assert m["fair/group_0/selection_rate"] == 0.75  # 0.5 is no longer selected; 0.6 still is
  assert m["fair/group_1/selection_rate"] == 0.0


def test_empty_group_and_undefined_rates_are_nan():
  groups = np.array([0, 0, 0, 0, 2, 2, 2, 2])
  labels = np.array([1, 0, 0, 1, 0, 0, 0, 0])  # group 2 has no positives: TPR undefined
  m = group_metrics(PREDICTIONS, labels, groups, num_groups=3)
  assert m["fairness/group_1/count"] == 0
  for rate in ("accuracy", "selection_rate", "tpr", "fpr"):
    assert math.isnan(m[f"fairness/group_1/{rate}"])
  assert math.isnan(m["fairness/group_2/tpr"])
  assert m["fairness/group_2/fpr"] == 0.25
  # Gaps ignore undefined rates: TPR is defined for group 0 only, so its gap is 0.
  assert m["fairness/equal_opportunity_difference"] == 0.0
  assert m["fairness/equalized_odds_difference"] == 0.75  # FPR: 1.0 vs 0.25
  assert m["fairness/demographic_parity_difference"] == 0.75
  # No one selected anywhere: the parity ratio is 0/0.
  m = group_metrics(np.zeros(8, int), LABELS, GROUPS)
  assert math.isnan(m["fairness/demographic_parity_ratio"])
  assert m["fairness/demographic_parity_difference"] == 0.0


def test_matches_brute_force_definitions():
  rng = np.random.default_rng(0)
  n, k = 300, 4
  scores, labels, groups = rng.random(n), rng.integers(0, 2, n), rng.integers(0, k, n)
  m = group_metrics(scores, labels, groups, threshold=0.3)
  sel, tprs, fprs = [], [], []
  for g in range(k):
    rows = [i for i in range(n) if groups[i] == g]
    pred = {i: int(scores[i] >= 0.3) for i in rows}
    pos = [i for i in rows if labels[i] == 1]
    neg = [i for i in rows if labels[i] == 0]
    sel.append(sum(pred[i] for i in rows) / len(rows))
    tprs.append(sum(pred[i] for i in pos) / len(pos))
    fprs.append(sum(pred[i] for i in neg) / len(neg))
    acc = sum(pred[i] == labels[i] for i in rows) / len(rows)
    assert m[f"fairness/group_{g}/accuracy"] == pytest.approx(acc)
    assert m[f"fairness/group_{g}/selection_rate"] == pytest.approx(sel[-1])
    assert m[f"fairness/group_{g}/tpr"] == pytest.approx(tprs[-1])
    assert m[f"fairness/group_{g}/fpr"] == pytest.approx(fprs[-1])
    assert m[f"fairness/group_{g}/count"] == len(rows)
  assert m["fairness/demographic_parity_difference"] == pytest.approx(max(sel) - min(sel))
  assert m["fairness/demographic_parity_ratio"] == pytest.approx(min(sel) / max(sel))
  tpr_gap, fpr_gap = max(tprs) - min(tprs), max(fprs) - min(fprs)
  assert m["fairness/equal_opportunity_difference"] == pytest.approx(tpr_gap)
  assert m["fairness/equalized_odds_difference"] == pytest.approx(max(tpr_gap, fpr_gap))


def test_bad_inputs_are_config_errors():
  with pytest.raises(ConfigError, match="binary"):
    group_metrics(PREDICTIONS, LABELS * 2, GROUPS)
  with pytest.raises(ConfigError, match="length"):
    group_metrics(PREDICTIONS[:3], LABELS, GROUPS)
  with pytest.raises(ConfigError, match="outside"):
    group_metrics(PREDICTIONS, LABELS, GROUPS, num_groups=1)
  with pytest.raises(ConfigError, match="integer"):
    group_metrics(PREDICTIONS, LABELS, GROUPS.astype(float))


def test_reweighing_hand_computed():
  # P(g=0)=3/4, P(g=1)=1/4, P(y=1)=P(y=0)=1/2; P(0,1)=1/2, P(0,0)=1/4, P(1,0)=1/4.
  w = reweighing_weights(np.array([1, 1, 0, 0]), np.array([0, 0, 0, 1]))
  np.testing.assert_allclose(w, [0.75, 0.75, 1.5, 0.5])


def test_reweighing_makes_label_independent_of_group():
  rng = np.random.default_rng(1)
  groups = rng.integers(0, 3, 500)
  labels = (rng.random(500) < np.array([0.2, 0.5, 0.8])[groups]).astype(int)  # skewed by group
  w = reweighing_weights(labels, groups)
  assert w.sum() == pytest.approx(len(labels))  # every (group, label) cell occurs
  p_y = labels.mean()
  for g in range(3):
    member = groups == g
    assert np.sum(w[member] * labels[member]) / np.sum(w[member]) == pytest.approx(p_y)
    # Brute force from the definition P(g) P(y) / P(g, y).
    for y in (0, 1):
      cell = member & (labels == y)
      expected = member.mean() * (labels == y).mean() / cell.mean()
      np.testing.assert_allclose(w[cell], expected)
