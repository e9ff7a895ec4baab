"""Yearly sunspot numbers (Wolfer/SIDC, 1700-2008) as a windowed forecasting builder. The series
ships inside statsmodels (``statsmodels.datasets.sunspots``), so preparing it needs no network."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deepflow.data.bundled.base import WindowConfig, WindowedSeriesBuilder, register_builder

if TYPE_CHECKING:
  import pandas as pd


def raw_sunspots() -> pd.Series:
  """Yearly mean sunspot activity indexed by year (int), 309 values, none missing."""
  import pandas as pd
  import statsmodels.api as sm
  data = sm.datasets.sunspots.load_pandas().data
  return pd.Series(data["SUNACTIVITY"].to_numpy(), index=data["YEAR"].astype(int).to_numpy(),
                   name="sunspots")


@register_builder("sunspots")
class DeepflowSunspots(WindowedSeriesBuilder):
  """Yearly sunspot activity, windows ``{'inputs': (window, 1), 'targets': (horizon,), 'time'}``.

  Config ``default``: window 12 years, horizon 1, test fraction 0.2 over the 309 years
  1700-2008: cut at index 247 (year 1947), train 235 / test 62 windows. Nothing is missing;
  values are raw (not normalized)."""
  BUILDER_CONFIGS = [
      WindowConfig(name="default", window=12, horizon=1, test_fraction=0.2,
                   description="12 years in, the next year out."),
  ]
  HOMEPAGE = "https://www.statsmodels.org/stable/datasets/generated/sunspots.html"

  def _series(self) -> tuple[pd.Series, dict[str, Any]]:
    return raw_sunspots(), {"units": "yearly mean sunspot number", "filled": []}
