"""Real encoded images through ``tfds:``: decoding (against TFDS's own), the cache decision,
bounded statistics, and the per-example ImageNet-style transforms."""
import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from deepflow.data import images, sources
from deepflow.data.pipeline import INPUTS, TARGETS, Pipeline
from deepflow.registry import ConfigError
from tests.helpers import tiny_config

CROP = "{'name': 'random_resized_crop', 'size': 12}"


def image_config(data_dir, name="gen_jpeg", *overrides):
  return tiny_config(f"data.source=tfds:{name}", f"data.data_dir={data_dir}",
                     "train.progress=False", *overrides)


@pytest.mark.parametrize("name", ["gen_jpeg", "gen_png"])
def test_decoding_matches_tfds_own_decoder(image_data_dir, name):
  builder = tfds.builder(name, data_dir=image_data_dir)
  ours = sources.open_dataset(image_config(image_data_dir, name).data).split("train")
  theirs = builder.as_data_source(split="train")  # TFDS decodes with PIL
  assert isinstance(ours, images.DecodedSource)
  for i in range(0, len(theirs), 7):
    np.testing.assert_array_equal(ours[i]["image"], theirs[i]["image"])
    assert ours[i]["label"] == theirs[i]["label"]


def test_small_split_is_cached_large_one_streamed_same_batches(image_data_dir, caplog):
  caplog.set_level("INFO", logger="deepflow")
  cached = Pipeline(image_config(image_data_dir))
  assert isinstance(cached.train_source, sources.ArraySource)
  assert "caching split 'train' (320 examples" in caplog.text
  streamed = Pipeline(image_config(image_data_dir, "gen_jpeg", "data.cache_budget_gb=0"))
  assert not isinstance(streamed.train_source, sources.ArraySource)
  assert "streaming split 'train'" in caplog.text
  a, b = cached.train_iterator(), streamed.train_iterator()
  for _ in range(3):
    x, y = next(a), next(b)
    np.testing.assert_array_equal(x[INPUTS], y[INPUTS])
    np.testing.assert_array_equal(x[TARGETS], y[TARGETS])
  assert cached.spec.input_shape == (16, 16, 3) and cached.spec.num_classes == 10


def test_statistics_read_a_bounded_sample_not_the_split(image_data_dir, monkeypatch):
  reads = []
  original = images.DecodedSource._decoded  # every decoded example passes here
  monkeypatch.setattr(images.DecodedSource, "_decoded",
                      lambda self, e: reads.append(self) or original(self, e))
  p = Pipeline(image_config(image_data_dir, "gen_jpeg", "data.cache=False",
                            "data.stats_examples=50"))
  ours = sum(source is p.train_source for source in reads)  # not other tests' prefetching
  assert ours <= 50 + 16 + 1  # the sample, the size estimate, one example for shapes
  # The sample is a fair one: its per-channel mean is near the whole split's.
  split = tfds.builder("gen_jpeg", data_dir=image_data_dir).as_data_source(split="train")
  full = np.stack([split[i]["image"] for i in range(320)]).astype(np.float32)
  np.testing.assert_allclose(p.stats[0]["mean"].ravel(), full.mean((0, 1, 2)), rtol=0.05)


def test_statistics_on_the_whole_split_when_it_is_small(image_data_dir):
  p = Pipeline(image_config(image_data_dir, "gen_jpeg", "data.cache=False"))
  builder = tfds.builder("gen_jpeg", data_dir=image_data_dir)
  split = builder.as_data_source(split="train")
  full = np.stack([split[i]["image"] for i in range(len(split))]).astype(np.float32)
  np.testing.assert_allclose(p.stats[0]["mean"].ravel(), full.mean((0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(p.stats[0]["std"].ravel(), full.std((0, 1, 2)), rtol=1e-4)


def pil_eval_crop(encoded: bytes, size: int, side: int) -> np.ndarray:
  """The reference eval crop, by hand with PIL: shorter side to ``side``, central ``size``."""
  image = Image.open(io.BytesIO(encoded)).convert("RGB")
  w, h = image.size
  scale = side / min(h, w)
  image = image.resize((max(side, round(w * scale)), max(side, round(h * scale))),
                       Image.Resampling.BILINEAR)
  left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
  return np.asarray(image)[top:top + size, left:left + size]


def test_variable_size_images_random_resized_crop_and_eval_center_crop(image_data_dir):
  config = image_config(image_data_dir, "gen_png",
                        f"data.transforms=[{CROP}, {{'name': 'flip'}}]", "data.eval_batch_size=32")
  p = Pipeline(config)
  assert not isinstance(p.train_source, sources.ArraySource)  # variable shapes: streamed
  batch = next(p.train_iterator())
  assert batch[INPUTS].shape == (32, 12, 12, 3) and p.spec.input_shape == (12, 12, 3)
  again = next(Pipeline(config).train_iterator())
  np.testing.assert_array_equal(batch[INPUTS], again[INPUTS])   # a function of (seed, step)
  raw = tfds.builder("gen_png", data_dir=image_data_dir).as_data_source(
      split="test", decoders={"image": tfds.decode.SkipDecoding()})
  evaluated = next(p.eval_batches("test"))[INPUTS]
  for i in (0, 5, 31):  # eval: shorter side to round(12 / 0.875) = 14, centre 12x12
    np.testing.assert_array_equal(evaluated[i], pil_eval_crop(raw[i]["image"], 12, 14))


def test_random_crops_depend_on_the_example_not_on_the_host(image_data_dir):
  config = image_config(image_data_dir, "gen_png", f"data.transforms=[{CROP}]")
  single = next(Pipeline(config).train_iterator())[INPUTS]
  parts = []
  for index in range(2):
    p = Pipeline(config)
    p.process_index, p.process_count, p.batch_size = index, 2, p.global_batch_size // 2
    parts.append(next(p.train_iterator())[INPUTS])
  np.testing.assert_array_equal(np.concatenate(parts), single)
  it = Pipeline(config).train_iterator()
  assert not np.array_equal(next(it)[INPUTS], next(it)[INPUTS])


def test_random_resized_crop_covers_the_scale_range():
  t = images.random_resized_crop(size=8, scale=(0.25, 0.5), ratio=(1.0, 1.0))
  # An image whose pixels hold their own column: a crop's width shows in its value range.
  image = np.broadcast_to(np.arange(200, dtype=np.uint8)[None, :, None], (200, 200, 3)).copy()
  spans = [np.ptp(t.apply({}, image, np.random.default_rng(s)).astype(int)) for s in range(50)]
  # 8 output pixels sample a crop of width w at centres w/16 ... w - w/16: a span of 7w/8.
  widths = np.array(spans) * 8 / 7
  # A square crop of area fraction f has side 200 sqrt(f): 100 to 141 pixels.
  assert 97 <= widths.min() < 110 and 130 < widths.max() <= 144


def test_bad_image_transform_configs_are_one_line_errors(image_data_dir):
  with pytest.raises(ConfigError, match="must come before 'standardize'"):
    Pipeline(image_config(image_data_dir, "gen_png",
                          f"data.transforms=[{{'name': 'standardize'}}, {CROP}]"))
  with pytest.raises(ConfigError, match="differ in shape"):
    Pipeline(image_config(image_data_dir, "gen_png", "data.cache=True",
                          f"data.transforms=[{CROP}]"))
  with pytest.raises(ConfigError, match="data.cache must be True, False or 'auto'"):
    tiny_config("data.cache=sometimes")
  with pytest.raises(ConfigError, match="data.workers must be an int >= 0"):
    tiny_config("data.workers=-1")
  with pytest.raises(ConfigError, match="size must be"):
    images.center_crop(size=[3])
  with pytest.raises(ConfigError, match="smaller than"):
    images.center_crop(size=40).apply({}, np.zeros((20, 20, 3), np.uint8), None)


def test_worker_processes_give_the_same_batches_and_resume_anywhere(image_data_dir):
  """Two worker processes: the batches of a single-process run, in order; a state saved with
  workers resumes without them (and vice versa), since it is only the next step."""
  config = image_config(image_data_dir, "gen_png", f"data.transforms=[{CROP}]")
  want = [b[INPUTS] for b, _ in zip(Pipeline(config).train_iterator(), range(6))]
  workers = Pipeline(image_config(image_data_dir, "gen_png", f"data.transforms=[{CROP}]",
                                  "data.workers=2"))
  it = workers.train_iterator()
  try:
    got = [next(it)[INPUTS] for _ in range(4)]
    state = it.get_state()
  finally:
    it.close()
  assert state == {"next_index": 4}
  resumed = Pipeline(config).train_iterator(state)
  got += [next(resumed)[INPUTS] for _ in range(2)]
  for x, y in zip(got, want):
    np.testing.assert_array_equal(x, y)


def test_no_workers_for_a_split_held_in_memory(image_data_dir, caplog):
  caplog.set_level("INFO", logger="deepflow")
  p = Pipeline(image_config(image_data_dir, "gen_jpeg", "data.workers=2"))
  assert isinstance(p.train_source, sources.ArraySource) and p.workers == 0
  assert "data.workers=2 not used" in caplog.text


def test_no_reader_threads_for_an_in_memory_split_without_per_example_steps(image_data_dir):
  in_memory = Pipeline(image_config(image_data_dir, "gen_jpeg", "data.num_threads=2"))
  assert isinstance(in_memory.train_source, sources.ArraySource) and in_memory.num_threads == 0
  cropped = Pipeline(image_config(image_data_dir, "gen_jpeg", "data.num_threads=2",
                                  "data.transforms=[{'name': 'random_resized_crop', 'size': 4}]"))
  assert cropped.num_threads == 2
  streamed = Pipeline(image_config(image_data_dir, "gen_jpeg", "data.num_threads=2",
                                   "data.cache=False"))
  assert streamed.num_threads == 2
