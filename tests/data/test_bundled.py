"""The bundled builders prepare offline without TensorFlow, give their documented splits and
shapes, and hold exactly the source data: no time leakage, text in stream order, knocked-out
values only where NaN, rare positives at ~5%, fairness groups as pandas counts them."""
import sys

import numpy as np
import pandas as pd
import pytest
import tensorflow_datasets as tfds

from deepflow.data.bundled import BUILDERS
from deepflow.data.bundled.base import derive_config
from deepflow.data.bundled.co2 import fill_gaps, raw_co2
from deepflow.data.bundled.text import corpus

# name -> (config, {split: size}, {feature: (shape, dtype)}); text sizes depend on the corpus.
SPECS = {
    "co2": ("monthly", {"train": 397, "test": 105},
            {"inputs": ((24, 1), np.float32), "targets": ((1,), np.float32), "time": ((), int)}),
    "sunspots": ("default", {"train": 235, "test": 62},
                 {"inputs": ((12, 1), np.float32), "targets": ((1,), np.float32),
                  "time": ((), int)}),
    "text": ("seq128", None, {"inputs": ((128,), np.int32), "targets": ((128,), np.int32),
                              "offset": ((), int)}),
    "fair": ("without_age", {"train": 5092, "test": 1274},
             {"features": ((7,), np.float32), "label": ((), int), "group": ((), int),
              "row": ((), int)}),
    "breast_cancer": (None, {"train": 455, "test": 114},
                      {"features": ((30,), np.float32), "label": ((), int), "row": ((), int)}),
    "breast_cancer_missing": (None, {"train": 455, "test": 114},
                              {"features": ((30,), np.float32), "label": ((), int),
                               "row": ((), int)}),
    "breast_cancer_rare": (None, {"train": 300, "test": 76},
                           {"features": ((30,), np.float32), "label": ((), int),
                            "row": ((), int)}),
    "wine": (None, {"train": 142, "test": 36},
             {"features": ((13,), np.float32), "label": ((), int), "row": ((), int)}),
}


@pytest.fixture(scope="module")
def prepare(data_dir):
  """Prepares a builder (name, config) into the session data dir once; returns the builder."""
  cache = {}

  def _prepare(name, config=None):
    key = (name, config if config is None or isinstance(config, str) else config.name)
    if key not in cache:
      builder = BUILDERS[name](data_dir=data_dir, config=config)
      builder.download_and_prepare()
      cache[key] = builder
    return cache[key]
  return _prepare


def read(source) -> dict[str, np.ndarray]:
  """Every example of a data source, stacked per feature."""
  examples = [source[i] for i in range(len(source))]
  return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}


def splits(builder) -> dict[str, dict[str, np.ndarray]]:
  return {split: read(source) for split, source in builder.as_data_source().items()}


def test_names():
  assert set(BUILDERS) >= set(SPECS) | {"digits"}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_prepares_offline_with_documented_splits(name, prepare, data_dir):
  config, sizes, features = SPECS[name]
  builder = prepare(name, config)
  # Read back by registered name, as deepflow's loader does, from a fresh builder.
  full = builder.name + (f"/{config}" if config else "")
  sources = tfds.data_source(full, data_dir=data_dir)
  if sizes is None:  # text: chunks of seq_len + 1 characters inside each split's boundaries
    bounds = builder.info.metadata["boundaries"]
    sizes = {k: (b - a - 1) // 128 for k, (a, b) in bounds.items()}
  assert {k: len(v) for k, v in sources.items()} == sizes
  assert builder.info.supervised_keys[0] in features and builder.info.supervised_keys[1] in features
  for split in sizes:
    example = sources[split][len(sources[split]) - 1]
    assert set(example) == set(features)
    for key, (shape, dtype) in features.items():
      value = np.asarray(example[key])
      assert value.shape == shape, (key, value.shape)
      assert np.issubdtype(value.dtype, np.integer if dtype is int else dtype), (key, value.dtype)
  # Metadata is saved as JSON beside the data: readable without the builder's code.
  reloaded = tfds.builder_from_directory(builder.data_dir)
  assert dict(reloaded.info.metadata) == dict(builder.info.metadata)
  assert reloaded.info.supervised_keys == builder.info.supervised_keys
  assert "tensorflow" not in sys.modules


# --- time series ------------------------------------------------------------------------------

def _sunspots():
  import statsmodels.api as sm
  return sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy()


SERIES = [("co2", "monthly"), ("co2", "weekly"), ("sunspots", "default"),
          ("sunspots", {"window": 5, "horizon": 3, "test_fraction": 0.1})]


@pytest.mark.parametrize("name,config", SERIES, ids=lambda c: str(c))
def test_windows_split_by_time_without_leakage(name, config, prepare):
  if isinstance(config, dict):
    config = derive_config(BUILDERS[name], config)
  builder = prepare(name, config)
  cfg, meta = builder.builder_config, builder.info.metadata
  window, horizon, cut = cfg.window, cfg.horizon, meta["cut"]
  data = splits(builder)
  train, test = data["train"]["time"], data["test"]["time"]
  assert np.all(train - window >= 0) and np.all(train + horizon - 1 < cut)
  assert np.all(test >= cut) and np.all(test + horizon <= meta["length"])
  # Stride 1, every admissible window, stored in time order.
  np.testing.assert_array_equal(train, np.arange(window, cut - horizon + 1))
  np.testing.assert_array_equal(test, np.arange(cut, meta["length"] - horizon + 1))

  raw = _sunspots() if name == "sunspots" else raw_co2(cfg.frequency).to_numpy()
  assert len(raw) == meta["length"]
  for split in data.values():
    for x, y, t in zip(split["inputs"][..., 0], split["targets"], split["time"]):
      got = np.concatenate([x, y])
      want = raw[t - window:t + horizon].astype(np.float32)
      observed = ~np.isnan(want)
      np.testing.assert_array_equal(got[observed], want[observed])
      assert not np.isnan(got).any()
  if name == "co2":  # filled values lie between their observed neighbours
    filled = np.asarray(meta["filled"])
    assert len(filled) == int(np.isnan(raw).sum()) > 0
    series = np.full(len(raw), np.nan, np.float32)  # the stored series, rebuilt from windows
    for split in data.values():
      for x, y, t in zip(split["inputs"][..., 0], split["targets"], split["time"]):
        series[t - window:t + horizon] = np.concatenate([x, y])
    assert not np.isnan(series).any()
    observed = np.flatnonzero(~np.isnan(raw))
    for i in filled:
      lo, hi = observed[observed < i].max(), observed[observed > i].min()
      assert min(raw[lo], raw[hi]) - 1e-3 <= series[i] <= max(raw[lo], raw[hi]) + 1e-3


def test_gap_filling_does_not_look_past_the_cut():
  index = pd.date_range("2000-01-01", periods=6, freq="MS")
  series = pd.Series([1.0, np.nan, 3.0, np.nan, 100.0, np.nan], index=index)
  filled = fill_gaps(series, cut=4)
  # Before the cut: interpolated from the train side only; the gap at its end repeats the past.
  assert filled.iloc[1] == pytest.approx(2.0, abs=0.1) and filled.iloc[3] == 3.0
  assert filled.iloc[5] == 100.0


def test_derive_config():
  cls = BUILDERS["co2"]
  weekly = derive_config(cls, {"window": "104"}, base="weekly")
  assert (weekly.name, weekly.window, weekly.frequency) == ("weekly-window104", 104, "weekly")
  assert derive_config(cls, {"window": 24}) is cls.default_builder_config
  assert derive_config(BUILDERS["fair"], {"group_as_input": "true"}).group_as_input is True
  with pytest.raises(ValueError, match="unknown field"):
    derive_config(cls, {"widow": 3})
  with pytest.raises(ValueError, match="window"):
    derive_config(cls, {"window": 0})


# --- text -------------------------------------------------------------------------------------

def test_text_chunks_follow_the_corpus(prepare):
  builder = prepare("text")
  meta, seq_len = builder.info.metadata, builder.builder_config.seq_len
  text, vocab = corpus(), meta["vocab"]
  assert vocab == "".join(sorted(set(text))) and meta["corpus_chars"] == len(text)
  data = splits(builder)
  for split, (start, stop) in meta["boundaries"].items():
    chunks = data[split]
    offsets = chunks["offset"]
    assert np.all(offsets >= start) and np.all(offsets + seq_len + 1 <= stop)
    np.testing.assert_array_equal(np.diff(offsets), seq_len)  # non-overlapping, in order
    for x, y, offset in zip(chunks["inputs"], chunks["targets"], offsets):
      decoded = "".join(vocab[i] for i in x)
      assert decoded == text[offset:offset + seq_len]
      np.testing.assert_array_equal(x[1:], y[:-1])
      assert vocab[y[-1]] == text[offset + seq_len]
  assert (data["train"]["offset"].max() + seq_len < data["validation"]["offset"].min()
          <= data["validation"]["offset"].max() + seq_len < data["test"]["offset"].min())
  assert meta["boundaries"]["test"][0] == round(len(text) * 0.9)


def test_text_documents_are_the_paragraphs_of_each_split(prepare):
  """bundled:text/documents: the same character splits as the chunks, as text paragraphs."""
  builder = prepare("text", "documents")
  meta, text = builder.info.metadata, corpus()
  assert builder.info.supervised_keys is None and "seq_len" not in meta
  assert meta["boundaries"] == prepare("text").info.metadata["boundaries"]
  for split, source in builder.as_data_source().items():
    start, stop = meta["boundaries"][split]
    documents = [source[i]["text"].decode("utf-8") for i in range(len(source))]
    assert documents == [p for p in text[start:stop].split("\n\n") if p.strip()]
    assert meta["split_sizes"][split] == len(documents) > 100


# --- tables -----------------------------------------------------------------------------------

def _breast_cancer():
  from sklearn.datasets import load_breast_cancer
  data = load_breast_cancer()
  return data.data.astype(np.float32), 1 - data.target  # label 1 = malignant


def _joined(builder):
  data = splits(builder)
  return data, {k: np.concatenate([d[k] for d in data.values()]) for k in data["train"]}


@pytest.mark.parametrize("name", ["breast_cancer", "wine"])
def test_tables_equal_sklearn(name, prepare):
  from sklearn.datasets import load_wine
  x, y = _breast_cancer() if name == "breast_cancer" else (
      load_wine().data.astype(np.float32), load_wine().target)
  data, rows = _joined(prepare(name))
  assert sorted(rows["row"]) == list(range(len(y)))
  np.testing.assert_array_equal(rows["features"], x[rows["row"]])
  np.testing.assert_array_equal(rows["label"], y[rows["row"]])
  for label in np.unique(y):  # stratified: each class ~20% in test
    share = (data["test"]["label"] == label).sum() / (y == label).sum()
    assert 0.15 < share < 0.25


def test_missing_values_are_knocked_out_at_random(prepare):
  x, y = _breast_cancer()
  data, rows = _joined(prepare("breast_cancer_missing"))
  got, want = rows["features"], x[rows["row"]]
  missing = np.isnan(got)
  assert missing.sum() == round(0.1 * x.size)
  for split in data.values():
    assert 0.08 < np.isnan(split["features"]).mean() < 0.12
  assert missing.any(axis=0).all()  # every feature column has gaps
  np.testing.assert_array_equal(got[~missing], want[~missing])
  np.testing.assert_array_equal(rows["label"], y[rows["row"]])


def test_rare_positives(prepare):
  x, y = _breast_cancer()
  builder = prepare("breast_cancer_rare")
  data, rows = _joined(builder)
  assert len(np.unique(rows["row"])) == len(rows["row"]) == 376
  assert rows["label"].sum() == 19 and (rows["label"] == 0).sum() == (y == 0).sum()
  for split in data.values():
    assert 0.03 < split["label"].mean() < 0.07
  np.testing.assert_array_equal(rows["features"], x[rows["row"]])
  np.testing.assert_array_equal(rows["label"], y[rows["row"]])
  assert builder.info.metadata["label_counts"] == {"train": [285, 15], "test": [72, 4]}


@pytest.mark.parametrize("config", ["without_age", "with_age"])
def test_fair_groups_and_labels_match_pandas(config, prepare):
  import statsmodels.api as sm
  raw = sm.datasets.fair.load_pandas().data
  builder = prepare("fair", config)
  meta = builder.info.metadata
  data, rows = _joined(builder)
  assert sorted(rows["row"]) == list(range(len(raw)))
  source = raw.iloc[rows["row"]]
  np.testing.assert_array_equal(rows["label"], (source["affairs"] > 0).to_numpy())
  np.testing.assert_array_equal(rows["group"], (source["age"] >= 32).to_numpy())
  assert meta["group_sizes"] == {"under_32": int((raw["age"] < 32).sum()),
                                 "32_and_over": int((raw["age"] >= 32).sum())}
  assert np.bincount(rows["group"]).tolist() == [3870, 2496]
  assert rows["label"].mean() == pytest.approx((raw["affairs"] > 0).mean())
  names = meta["feature_names"]
  assert "affairs" not in names and ("age" in names) == (config == "with_age")
  np.testing.assert_array_equal(rows["features"], source[names].to_numpy(np.float32))
  # Stratified by label x group: every (label, group) cell puts 20% of its rows in test (+-1).
  cells = rows["label"] * 2 + rows["group"]
  test_cells = data["test"]["label"] * 2 + data["test"]["group"]
  for cell in range(4):
    assert abs((test_cells == cell).sum() - 0.2 * (cells == cell).sum()) <= 1


def test_no_tensorflow_after_everything():
  assert "tensorflow" not in sys.modules
