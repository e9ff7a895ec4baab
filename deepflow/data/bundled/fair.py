"""The 1974 Redbook survey of extramarital affairs (Fair, 1978; 6,366 married women) as a
fairness benchmark: a binary label, a demographic group and numeric features. The table ships
inside statsmodels (``statsmodels.datasets.fair``), so preparing it needs no network."""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from deepflow.data.bundled.base import Table, TableBuilder, register_builder

GROUP_AGE = 32  # group 1: age >= 32; the survey's age bins are 17.5, 22, 27, 32, 37, 42
GROUP_NAMES = ["under_32", "32_and_over"]
LABEL_NAMES = ["no_affair", "affair"]
FEATURES = ["rate_marriage", "yrs_married", "children", "religious", "educ", "occupation",
            "occupation_husb"]


@dataclasses.dataclass(eq=False)
class FairConfig(tfds.core.BuilderConfig):
  """``group_as_input``: whether ``age`` (the group's source) is also one of the features."""
  group_as_input: bool = False


def raw_fair():
  """The statsmodels table (pandas DataFrame), one row per woman."""
  import statsmodels.api as sm
  return sm.datasets.fair.load_pandas().data


@register_builder("fair")
class DeepflowFair(TableBuilder):
  """``{'features': float32 (d,), 'label', 'group', 'row'}``: label 1 = any affair (``affairs > 0``;
  2,053 of 6,366 = 32.2%), group 1 = age >= 32 (2,496 women, 40.1% label 1) vs group 0 = under 32
  (3,870, 27.2%).

  Why age: it is a protected attribute with a clear disparity in base rates, and its bins split
  the sample in two sizeable groups. The features are the survey's answers as statsmodels codes
  them (ordinal codes, e.g. occupation 1-6, as numbers): rate_marriage, yrs_married, children,
  religious, educ, occupation, occupation_husb; ``affairs`` (the label's source) is never one.
  Config ``without_age`` (default, d = 7) leaves ``age`` out of the inputs, so a model sees the
  group only through correlated features (yrs_married above all); ``with_age`` (d = 8) appends
  it. Split: fixed 80/20 train/test (seed 0) stratified by label x group, so both splits keep
  the group sizes and per-group label rates: train 5,092 / test 1,274."""
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [
      FairConfig(name="without_age", group_as_input=False,
                 description="Age (the group's source) is not an input."),
      FairConfig(name="with_age", group_as_input=True, description="Age is the last input."),
  ]
  HOMEPAGE = "https://www.statsmodels.org/stable/datasets/generated/fair.html"

  def _table(self) -> Table:
    data = raw_fair()
    names = FEATURES + (["age"] if self.builder_config.group_as_input else [])
    labels = (data["affairs"] > 0).to_numpy().astype(np.int64)
    groups = (data["age"] >= GROUP_AGE).to_numpy().astype(np.int64)
    return Table(
        features=data[names].to_numpy(dtype=np.float32), labels=labels, feature_names=names,
        class_names=LABEL_NAMES, strata=labels * 2 + groups,
        extra={"group": (tfds.features.ClassLabel(names=GROUP_NAMES), groups)},
        metadata={"group_names": GROUP_NAMES, "label_names": LABEL_NAMES,
                  "group": f"age >= {GROUP_AGE}", "label": "affairs > 0",
                  "group_sizes": {name: int((groups == g).sum())
                                  for g, name in enumerate(GROUP_NAMES)}})
