"""The regularization, missing-values and imbalance experiments: every variant's config loads and
validates, and each comparison script runs end to end for a few steps (on two of its variants, to
keep the suite fast)."""

import pytest

import deepflow
from tests.helpers import experiment, tiny

@pytest.mark.parametrize("name, table", [("overfitting", "LADDER"),
                                         ("tabular_missing", "VARIANTS"),
                                         ("imbalanced", "VARIANTS")])
def test_experiment_runs(name, table, data_dir, tmp_path, monkeypatch):
  path, module = experiment(name)
  variants = getattr(module, table)
  for overrides in variants.values():
    deepflow.load_config(path, overrides)  # every variant validates
  first, last = list(variants)[0], list(variants)[-1]
  monkeypatch.setattr(module, table, {k: variants[k] for k in (first, last)})
  seeds = [] if name == "overfitting" else ["--seeds", "1"]
  results = module.main(["--workdir", str(tmp_path), *seeds, *tiny(data_dir)])
  assert len(results) == 2
  if name == "overfitting":
    # Ten classes (chance 0.1) after 3 steps; measured: no regularization 0.66, mixup 0.23.
    assert results[first]["train_accuracy"] > 0.4 and results[last]["train_accuracy"] > 0.15
  else:
    for metrics in results.values():
      assert {"accuracy", "precision", "recall", "f1", "auc"} <= set(metrics["test"])


def test_missing_values_without_imputation_are_refused(data_dir, tmp_path):
  path, _ = experiment("tabular_missing")
  config = deepflow.load_config(path, [*tiny(data_dir),
                                       "data.transforms=[{'name': 'standardize'}]"])
  with pytest.raises(deepflow.ConfigError, match="missing values"):
    deepflow.train_and_evaluate(config, str(tmp_path))
