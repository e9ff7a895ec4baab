"""Atmospheric CO2 at Mauna Loa (ppm; weekly, March 1958 - December 2001) as a windowed
forecasting builder. The series ships inside statsmodels (``statsmodels.datasets.co2``), so
preparing it needs no network."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from deepflow.data.bundled.base import (WindowConfig, WindowedSeriesBuilder,
                                        register_builder, time_split_indices)

if TYPE_CHECKING:
  import pandas as pd

FREQUENCIES = {"monthly": "MS", "weekly": "W-SAT"}


@dataclasses.dataclass(eq=False)
class Co2Config(WindowConfig):
  """Windows over the CO2 series at ``frequency``: 'monthly' or 'weekly'."""
  frequency: str = "monthly"

  def __post_init__(self):
    super().__post_init__()
    if self.frequency not in FREQUENCIES:
      raise ValueError(f"frequency must be one of {sorted(FREQUENCIES)}, got {self.frequency!r}")


def raw_co2(frequency: str) -> pd.Series:
  """The CO2 series at ``frequency``, gaps still NaN: weekly as recorded (59 of 2,284 weeks
  missing); monthly the mean of each calendar month's observed weeks (5 of 526 months have
  none), labelled by the month's first day."""
  import statsmodels.api as sm
  weekly = sm.datasets.co2.load_pandas().data["co2"]
  if frequency == "weekly":
    return weekly
  return weekly.resample(FREQUENCIES[frequency]).mean()


def fill_gaps(series: pd.Series, cut: int) -> pd.Series:
  """``series`` with its NaNs filled by linear interpolation in time, separately on each side of
  the time split at ``cut``, so that no value before the cut is computed from one after it (a
  gap at the end of the train period repeats its last observation). Test-period gaps may use
  the (already filled) past."""
  import pandas as pd
  head = series.iloc[:cut].interpolate(method="time").ffill()
  filled = pd.concat([head, series.iloc[cut:]]).interpolate(method="time").ffill()
  if filled.isna().any():
    raise ValueError("the series starts with a gap, which interpolation cannot fill")
  return filled


@register_builder("co2")
class DeepflowCo2(WindowedSeriesBuilder):
  """Mauna Loa CO2 (ppm), windows ``{'inputs': (window, 1), 'targets': (horizon,), 'time'}``.

  Configs: ``monthly`` (default; 526 months 1958-03..2001-12, window 24, horizon 1, test
  fraction 0.2: cut at month 421 = 1993-04, train 397 / test 105 windows) and ``weekly`` (2,284
  weeks 1958-03-29..2001-12-29, window 52, horizon 1, test fraction 0.2: cut at week 1827 =
  1993-04-03, train 1775 / test 457 windows). Missing values (59 weeks; 5 months with no
  observed week) are filled by linear interpolation in time on each side of the cut (see
  ``fill_gaps``); their positions are in ``metadata['filled']``. Values in ppm, not normalized."""
  BUILDER_CONFIGS = [
      Co2Config(name="monthly", window=24, horizon=1, test_fraction=0.2, frequency="monthly",
                description="Monthly means, 24 months in, the next month out."),
      Co2Config(name="weekly", window=52, horizon=1, test_fraction=0.2, frequency="weekly",
                description="Weekly values, 52 weeks in, the next week out."),
  ]
  HOMEPAGE = "https://www.statsmodels.org/stable/datasets/generated/co2.html"

  def _series(self) -> tuple[pd.Series, dict[str, Any]]:
    raw = raw_co2(self.builder_config.frequency)
    cut = time_split_indices(len(raw), self.builder_config.test_fraction)
    filled = [int(i) for i in raw.isna().to_numpy().nonzero()[0]]
    return fill_gaps(raw, cut), {"units": "ppm", "filled": filled}
