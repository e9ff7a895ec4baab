"""Group fairness metrics for binary classifiers, and reweighing to mitigate label/group skew.

Pure numpy on host arrays (jax arrays are accepted and copied to host): these are evaluation
metrics over a whole split, computed once per eval, not inside a jitted step.

Definitions, per group g (positive class = 1):
  accuracy        P(pred == y | g)
  selection rate  P(pred = 1 | g)
  TPR             P(pred = 1 | y = 1, g)
  FPR             P(pred = 1 | y = 0, g)
A rate whose conditioning set is empty (an empty group, or a group without positives for TPR /
without negatives for FPR) is NaN. Gaps are max - min over the groups where the rate is defined,
and NaN if no group defines it; so one defined group gives a gap of 0.
"""
from __future__ import annotations

import numpy as np

from deepflow.registry import ConfigError

_RATES = ("accuracy", "selection_rate", "tpr", "fpr")


def _binary(name: str, values: np.ndarray) -> np.ndarray:
  if not np.isin(values, (0, 1)).all():
    raise ConfigError(f"{name} must be binary (0/1); got values {np.unique(values)[:5].tolist()}")
  return values.astype(bool)


def _hard_predictions(predictions: np.ndarray, threshold: float) -> np.ndarray:
  """Floating predictions are scores (``>= threshold`` is positive); ints/bools are labels."""
  if np.issubdtype(predictions.dtype, np.floating):
    return predictions >= threshold
  return _binary("hard predictions", predictions)


def _ratio(numerator: int, denominator: int) -> float:
  return numerator / denominator if denominator else float("nan")


def _gap(values: list[float]) -> float:
  defined = [v for v in values if not np.isnan(v)]
  return max(defined) - min(defined) if defined else float("nan")


def _min_over_max(values: list[float]) -> float:
  defined = [v for v in values if not np.isnan(v)]
  if not defined or max(defined) == 0:
    return float("nan")  # 0/0: no group is ever selected, so the ratio is undefined
  return min(defined) / max(defined)


def _check_inputs(predictions, labels, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  predictions, labels, groups = (np.asarray(a) for a in (predictions, labels, groups))
  for name, a in (("predictions", predictions), ("labels", labels), ("groups", groups)):
    if a.ndim != 1:
      raise ConfigError(f"{name} must be 1-D (one entry per example); got shape {a.shape}")
  if not len(predictions) == len(labels) == len(groups):
    raise ConfigError(f"predictions, labels and groups differ in length: {len(predictions)}, "
                      f"{len(labels)}, {len(groups)}")
  if not np.issubdtype(groups.dtype, np.integer):
    raise ConfigError(f"groups must be integer group ids; got dtype {groups.dtype}")
  return predictions, labels, groups


def group_metrics(predictions, labels, groups, *, threshold: float = 0.5,
                  num_groups: int | None = None, prefix: str = "fairness") -> dict[str, float]:
  """Per-group rates and fairness gaps as one flat dict, ready for a ``metrics.jsonl`` line.

  ``predictions`` are hard 0/1 labels (int/bool) or scores (float, positive when
  ``>= threshold``); ``labels`` are 0/1; ``groups`` are int ids. Groups reported are ``0 ..
  num_groups - 1`` when ``num_groups`` is given (so an absent group shows up, with NaN rates),
  else the ids present. Keys (with the default prefix):

    fairness/group_{g}/{count,positives,accuracy,selection_rate,tpr,fpr}
    fairness/{accuracy,selection_rate}                   over all examples
    fairness/demographic_parity_difference              max - min selection rate
    fairness/demographic_parity_ratio                   min / max selection rate (NaN if max 0)
    fairness/equal_opportunity_difference               TPR gap
    fairness/equalized_odds_difference                  max(TPR gap, FPR gap), defined ones
  """
  predictions, labels, groups = _check_inputs(predictions, labels, groups)
  y = _binary("labels", labels)
  pred = _hard_predictions(predictions, threshold)
  if num_groups is None:
    ids = np.unique(groups).tolist()
  else:
    outside = groups[(groups < 0) | (groups >= num_groups)]
    if outside.size:
      raise ConfigError(f"group id {int(outside[0])} is outside 0..{num_groups - 1}")
    ids = list(range(num_groups))

  out: dict[str, float] = {}
  rates: dict[str, list[float]] = {r: [] for r in _RATES}
  for g in ids:
    member = groups == g
    pos, neg = member & y, member & ~y
    group = {
        "count": float(member.sum()),
        "positives": float(pos.sum()),
        "accuracy": _ratio(int((pred == y)[member].sum()), int(member.sum())),
        "selection_rate": _ratio(int(pred[member].sum()), int(member.sum())),
        "tpr": _ratio(int(pred[pos].sum()), int(pos.sum())),
        "fpr": _ratio(int(pred[neg].sum()), int(neg.sum())),
    }
    for key, value in group.items():
      out[f"{prefix}/group_{g}/{key}"] = value
    for r in _RATES:
      rates[r].append(group[r])

  tpr_gap, fpr_gap = _gap(rates["tpr"]), _gap(rates["fpr"])
  odds = [v for v in (tpr_gap, fpr_gap) if not np.isnan(v)]
  out.update({
      f"{prefix}/accuracy": _ratio(int((pred == y).sum()), len(y)),
      f"{prefix}/selection_rate": _ratio(int(pred.sum()), len(y)),
      f"{prefix}/demographic_parity_difference": _gap(rates["selection_rate"]),
      f"{prefix}/demographic_parity_ratio": _min_over_max(rates["selection_rate"]),
      f"{prefix}/equal_opportunity_difference": tpr_gap,
      f"{prefix}/equalized_odds_difference": max(odds) if odds else float("nan"),
  })
  return out


def reweighing_weights(labels, groups) -> np.ndarray:
  """Per-example weights ``P(g) P(y) / P(g, y)`` (Kamiran & Calders, 2012, "reweighing").

  When every (group, label) pair occurs, the label is independent of the group under these
  weights (weighted P(y | g) = P(y) for every group) and they sum to the number of examples; use
  them as sample weights in the loss to train on a de-biased version of the data. Labels may be
  any discrete values here.
  """
  labels, groups = np.asarray(labels), np.asarray(groups)
  if labels.ndim != 1 or labels.shape != groups.shape:
    raise ConfigError(f"labels and groups must be 1-D and of equal length; got {labels.shape} "
                      f"and {groups.shape}")
  n = len(labels)
  if n == 0:
    return np.zeros((0,), np.float64)
  _, g_idx, g_count = np.unique(groups, return_inverse=True, return_counts=True)
  _, y_idx, y_count = np.unique(labels, return_inverse=True, return_counts=True)
  joint = np.zeros((len(g_count), len(y_count)), np.int64)
  np.add.at(joint, (g_idx, y_idx), 1)
  # Each example's (g, y) cell is non-empty (it holds the example), so no division by zero.
  return g_count[g_idx] * y_count[y_idx] / (n * joint[g_idx, y_idx])
