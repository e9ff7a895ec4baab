"""Text at scale: a real TFDS text dataset (Python's help topics cut into paragraphs, written to
ArrayRecord offline), a trained SentencePiece tokenizer, rows packed with document boundaries
kept in attention and loss, and resumable training through `deepflow train`."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
import tokenizers as hf

import deepflow
from deepflow import config as config_lib, export, sample
from deepflow.data import hf_tokenizer, packing, sources, tokenizers
from deepflow.data.bundled.text import corpus
from deepflow.models import transformer
from deepflow.registry import ConfigError
from deepflow.train.experiment import Experiment
from tests.helpers import TINY, deepflow_cli, experiment_text, tiny_config, write_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
GPT2_TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "hf_tokenizers", "gpt2_bpe")


def paragraphs() -> list[tuple[str, str]]:
  """(topic, paragraph) for every non-blank paragraph of the help topics, in sorted order."""
  from pydoc_data.topics import topics
  return [(key, p) for key in sorted(topics) for p in topics[key].split("\n\n") if p.strip()]


class PydocParagraphs(tfds.core.GeneratorBasedBuilder):
  """Paragraphs as documents: ``text`` and the ``topic`` they come from (two Text features, so
  the loader must be told which is the text). Topics in sorted order: the first 90% train."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "text": tfds.features.Text(), "topic": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    docs = paragraphs()
    cut = int(0.9 * len(docs))
    return {"train": self._generate_examples(docs[:cut]),
            "test": self._generate_examples(docs[cut:])}

  def _generate_examples(self, docs):
    for i, (topic, text) in enumerate(docs):
      yield i, {"text": text, "topic": topic}


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("text_tfds"))
  PydocParagraphs(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


# The tiny experiment as a language model on the paragraphs (config paths -> values).
TEXT = {
    **TINY, "task.name": "language_model",
    "model": dict(name="transformer_lm", d_model=16, num_heads=2, num_layers=1, mlp_dim=32,
                  max_len=64),
    "data.source": "tfds:pydoc_paragraphs", "data.text_feature": "text",
    "data.tokenizer": "sentencepiece:bpe:1000", "data.seq_len": 64, "data.transforms": [],
    "data.batch_size": 8, "data.eval_batch_size": 16, "train.steps": 2, "train.log_every": 2,
    "train.checkpoint_every": 2, "train.compilation_cache": ""}
EXPERIMENT = experiment_text(TEXT)


def text_config(data_dir, *overrides):
  return tiny_config(f"data.data_dir={data_dir}", *overrides, **TEXT)


# -- packing against a hand reference ---------------------------------------------------------


def test_rows_follow_the_hand_packed_reference():
  """Documents of 2, 4 and 1 tokens (3, 5, 2 pairs) in rows of 4: documents cross rows, and
  every pair stays inside its document."""
  docs = {0: [11, 12], 1: [21, 22, 23, 24], 2: [31]}
  stream = packing.PackedStream(np.array([3, 5, 2]), 4, drop_remainder=False)
  assert stream.rows_per_epoch == 3
  batch = packing.pack_rows(stream, [0, 1, 2], lambda ds: {
      d: packing.document_pairs(docs[d], bos=1, eos=2) for d in ds})
  np.testing.assert_array_equal(batch["inputs"], [[1, 11, 12, 1], [21, 22, 23, 24], [1, 31, 0, 0]])
  np.testing.assert_array_equal(batch["targets"], [[11, 12, 2, 21], [22, 23, 24, 2],
                                                   [31, 2, 0, 0]])
  np.testing.assert_array_equal(batch["segments"], [[1, 1, 1, 2], [1, 1, 1, 1], [1, 1, 0, 0]])
  np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 0]])
  with pytest.raises(ValueError, match="pieces of 5 pairs do not fit a row of 4"):
    packing.pack_row([(np.arange(3), np.arange(3)), (np.arange(2), np.arange(2))], 4)


def test_training_rows_cover_each_epoch_once_in_a_seeded_order():
  lengths = np.array([3, 5, 2, 7, 1, 6])
  stream = packing.PackedStream(lengths, 4, lambda e: np.random.default_rng(e).permutation(6))
  assert stream.rows_per_epoch == 24 // 4
  for epoch in (0, 1):
    rows = range(epoch * 6, epoch * 6 + 6)
    covered = np.zeros(24, int)
    for r in rows:
      for doc, a, b in stream.spans(r):
        start = int(lengths[:doc].sum())
        covered[start + a:start + b] += 1
    np.testing.assert_array_equal(covered, 1)  # every pair of every document once per epoch
  assert stream.spans(6) != stream.spans(0)    # a new order in the next epoch


@pytest.mark.parametrize("scan", [False, True])
def test_packed_document_equals_the_document_alone(scan):
  """The LM's output on document 2 packed after document 1 equals its output run alone
  (segments reach every block, scanned or not)."""
  model = transformer.TransformerLM(50, vocab_size=50, d_model=16, num_heads=2, num_layers=2,
                                    mlp_dim=32, max_len=16, scan_layers=scan)
  first, second = [5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15]
  packed = jnp.array([first + second + [0] * 5])
  segments = jnp.array([[1] * 5 + [2] * 6 + [0] * 5])
  positions = jnp.array([list(range(5)) + list(range(6)) + [0] * 5])
  params = model.init(jax.random.key(0), packed)
  apply = jax.jit(model.apply)
  out = apply(params, packed, segments, positions)
  alone = apply(params, jnp.array([second]))
  np.testing.assert_allclose(out[0, 5:11], alone[0], atol=1e-5, rtol=1e-5)
  unmasked = apply(params, packed)  # without segments document 2 sees document 1
  assert np.abs(np.asarray(unmasked[0, 5:11] - alone[0])).max() > 1e-3


def test_loss_counts_each_document_alone_and_no_padding(text_dir, tmp_path):
  """The task's loss on a packed batch equals the token-weighted mean of each document's
  cross-entropy computed alone; padding and other documents contribute nothing."""
  exp = Experiment(text_config(text_dir), str(tmp_path))
  state = exp.init_state()
  docs = {0: [40, 41, 42], 1: [50, 51, 52, 53, 54]}
  tok = exp.pipeline.tokenizer
  stream = packing.PackedStream(np.array([4, 6]), 16, drop_remainder=False)
  batch = packing.pack_rows(stream, [0], lambda ds: {
      d: packing.document_pairs(docs[d], tok.bos, tok.eos) for d in ds})
  loss, _ = jax.jit(exp.task.loss)(state.params, state.model_state, batch, None)
  apply, variables = jax.jit(exp.task.model.apply), {"params": state.params}
  nll, count = 0.0, 0
  for tokens in docs.values():
    inputs, targets = packing.document_pairs(tokens, tok.bos, tok.eos)
    logits = apply(variables, jnp.asarray(inputs)[None])
    nll += float(optax.softmax_cross_entropy_with_integer_labels(logits[0], targets).sum())
    count += len(targets)
  np.testing.assert_allclose(float(loss), nll / count, rtol=1e-5)


# -- the tokenizer and the pipeline ------------------------------------------------------------


def test_trained_tokenizer_is_lossless_and_kept_in_the_workdir(text_dir, tmp_path):
  exp = Experiment(text_config(text_dir), str(tmp_path))
  tok = exp.pipeline.tokenizer
  assert tok.vocab_size == exp.task.model.vocab_size == 1000
  text = paragraphs()[3][1]
  ids = tok.encode([text])[0]
  assert tok.decode(ids) == text and len(ids) < len(text) / 2  # subwords, not characters
  saved = tmp_path / tokenizers.TOKENIZER_FILE
  again = Experiment(text_config(text_dir, "data.tokenizer='sentencepiece:bpe:500'"),
                     str(tmp_path)).pipeline.tokenizer  # the workdir's model wins
  assert again.encode([text]) == [ids]
  loaded = Experiment(text_config(text_dir, f"data.tokenizer='sentencepiece:{saved}'"),
                      None).pipeline.tokenizer
  assert loaded.encode([text]) == [ids]


def test_eval_packs_every_token_of_the_split_once(text_dir, tmp_path):
  exp = Experiment(text_config(text_dir, "data.tokenizer=byte"), str(tmp_path))
  test_docs = [t for _, t in paragraphs()][int(0.9 * len(paragraphs())):]
  expected_pairs = sum(len(t.encode("utf-8")) + 1 for t in test_docs)
  batches = list(exp.pipeline.eval_batches("test"))
  real = sum(int((b["segments"][b["mask"] > 0] > 0).sum()) for b in batches)
  assert real == expected_pairs
  state = exp.init_state()
  assert exp.evaluate(state, "test")["tokens"] == expected_pairs


def test_train_batches_are_a_pure_function_of_seed_and_step(text_dir, tmp_path):
  exp = Experiment(text_config(text_dir, "data.tokenizer=byte"), str(tmp_path))
  it = exp.pipeline.train_iterator()
  first = [next(it) for _ in range(3)]
  resumed = exp.pipeline.train_iterator({**it.get_state()})
  fresh = Experiment(text_config(text_dir, "data.tokenizer=byte"), str(tmp_path)).pipeline
  again = fresh.train_iterator()
  for b in first:
    np.testing.assert_array_equal(next(again)["inputs"], b["inputs"])
  np.testing.assert_array_equal(next(resumed)["inputs"], next(again)["inputs"])
  assert first[0]["inputs"].shape == (8, 64) and (first[0]["segments"] > 1).any()


def test_worker_processes_give_the_same_batches_and_resume(text_dir, tmp_path):
  """data.workers=2 against 0: the same rows, and a state saved with workers resumes without."""
  settings = ("data.tokenizer=byte", "data.num_threads=1")
  ours = Experiment(text_config(text_dir, *settings, "data.workers=2"), str(tmp_path)).pipeline
  alone = Experiment(text_config(text_dir, *settings), str(tmp_path)).pipeline.train_iterator()
  it = ours.train_iterator()
  try:
    for _ in range(3):
      a, b = next(it), next(alone)
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    state = it.get_state()
  finally:
    it.close()
  assert state == {"next_index": 3}
  resumed = Experiment(text_config(text_dir, *settings), str(tmp_path)).pipeline
  np.testing.assert_array_equal(next(resumed.train_iterator(state))["inputs"],
                                next(alone)["inputs"])


@pytest.mark.parametrize("override, message", [
    ("data.tokenizer='wordpiece:10'", "must be 'byte'"),
    ("data.tokenizer='sentencepiece:/no/such.model'", "not found"),
    ("data.text_feature=title", "has no feature 'title'"),
    ("data.text_feature=''", "needs data.text_feature"),
    ("data.source=bundled:text", "no Text feature for data.tokenizer to read .*"
                                 "data.source='bundled:text/documents'"),
    ("data.source=synthetic:digits_like", "reads a TFDS or bundled text dataset"),
])
def test_bad_text_settings_fail_in_one_line(text_dir, tmp_path, override, message):
  with pytest.raises(ConfigError, match=message):
    Experiment(text_config(text_dir, override), str(tmp_path))


def test_a_tokenizer_larger_than_the_declared_model_fails_before_any_write(text_dir, tmp_path):
  config = text_config(text_dir, f"data.tokenizer='hf:{GPT2_TOKENIZER}'", "model.vocab_size=1000")
  with pytest.raises(ConfigError, match=r"gpt2_bpe/tokenizer.json has 1001 ids, more than "
                                        r"model.vocab_size=1000"):
    Experiment(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / tokenizers.HF_TOKENIZER_DIR)
  Experiment(text_config(text_dir, f"data.tokenizer='hf:{GPT2_TOKENIZER}'",
                         "model.vocab_size=1024"), None)  # padded past the tokenizer: fine


# -- through the CLI, resumption included ------------------------------------------------------


def test_train_resume_and_sample_through_the_cli(text_dir, tmp_path):
  """2 steps, then `deepflow train` resuming to 4 in a fresh process (tokenizer and document
  lengths read back from the workdir), log what one uninterrupted run of 4 logs; sampling
  then tokenizes its prompt with the run's own tokenizer."""
  path = write_experiment(tmp_path / "text.py", EXPERIMENT)
  # One compilation cache for the three runs: the steps compile once.
  settings = ["data.tokenizer=sentencepiece:unigram:600",
              f"train.compilation_cache={tmp_path / 'cache'}"]
  whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
  deepflow.train_and_evaluate(text_config(text_dir, *settings, "train.steps=4"), whole)
  deepflow.train_and_evaluate(text_config(text_dir, *settings, "train.steps=2"), parts)
  out = deepflow_cli("train", "--config", path, "--workdir", parts,
                     *[f"--config.{s}" for s in settings],
                     f"--config.data.data_dir={text_dir}", "--config.train.steps=4")
  assert out.returncode == 0, out.stderr

  def train_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}
  assert train_losses(parts) == train_losses(whole)  # resumed on the same batches
  assert os.path.exists(os.path.join(parts, tokenizers.TOKENIZER_FILE))
  samples, _, _ = sample.sample_run(parts, 1, prompt="The ", num_tokens=5)
  assert samples["text"][0].startswith("The ") and samples["tokens"].shape[1] >= 6
  with pytest.raises(ConfigError, match="reads text through data.tokenizer"):
    export.export(parts, str(tmp_path / "artifact"))


def test_a_hugging_face_tokenizer_trains_resumes_and_samples_from_its_workdir_copy(data_dir,
                                                                                   tmp_path):
  """experiments/text_transformer.py with data.tokenizer='hf:DIR' (the GPT-2 style fixture) on
  the bundled help topics as documents: 2 steps, then resuming to 3 once DIR is gone (the
  workdir's copy is all there is); evaluation scores the test split as the library tokenizes
  it; sampling encodes its prompt as the library does, after BOS, and decodes as it does."""
  experiment = os.path.join(ROOT, "experiments", "text_transformer.py")
  model_dir = shutil.copytree(GPT2_TOKENIZER, tmp_path / "gpt2")
  settings = ["data.source=bundled:text/documents", f"data.data_dir={data_dir}",
              f"data.tokenizer=hf:{model_dir}", "data.seq_len=64",
              "model.max_len=64", "model.d_model=32", "model.mlp_dim=64", "data.batch_size=8",
              "data.eval_batch_size=64", "train.eval_every=0", "train.checkpoint_every=2",
              "optimizer.warmup_steps=1", "optimizer.decay_steps=3", "train.log_every=1",
              "train.progress=False", f"train.compilation_cache={tmp_path / 'cache'}"]
  parts = str(tmp_path / "parts")  # one compilation cache: the resumed run compiles nothing
  deepflow.train_and_evaluate(config_lib.load_config(experiment, [*settings, "train.steps=2"]),
                              parts)
  shutil.rmtree(model_dir)
  metrics = deepflow.train_and_evaluate(
      config_lib.load_config(experiment, [*settings, "train.steps=3"]), parts)
  with open(os.path.join(parts, "metrics.jsonl")) as f:
    steps = [row["step"] for row in map(json.loads, f) if row["split"] == "train"]
  assert steps == [1, 2, 3]  # resumed at 2, not started again
  library = hf.Tokenizer.from_file(os.path.join(GPT2_TOKENIZER, hf_tokenizer.TOKENIZER_JSON))
  builder, _ = sources.open_splits("bundled:text/documents", data_dir)
  start, stop = builder.info.metadata["boundaries"]["test"]
  test_docs = [p for p in corpus()[start:stop].split("\n\n") if p.strip()]
  assert metrics["tokens"] == sum(len(e.ids) + 1 for e in library.encode_batch(
      test_docs, add_special_tokens=False))  # eval scored every target of the split, as tokenized
  samples, _, _ = sample.sample_run(parts, 2, prompt="The for statement", num_tokens=6)
  prompt = [library.token_to_id("<|endoftext|>"), *library.encode("The for statement").ids]
  assert samples["tokens"].shape == (2, len(prompt) + 6)
  np.testing.assert_array_equal(samples["tokens"][:, :len(prompt)], [prompt, prompt])
  assert list(samples["text"]) == [library.decode(t.tolist()) for t in samples["tokens"]]
  assert tokenizers.vocab_size(f"hf:{model_dir}", parts) == 1001  # the copy, DIR being gone


def test_a_vectorized_sweep_trains_on_the_packed_text(text_dir, tmp_path):
  """Each member of a vectorized learning-rate sweep over a tokenized corpus ends where its
  trial trained alone ends."""
  from deepflow import sweep
  configs = [text_config(text_dir, "data.tokenizer=byte", "train.steps=3",
                         f"optimizer.learning_rate={lr}") for lr in (1e-3, 3e-2)]
  dirs = [str(tmp_path / f"member_{i}") for i in range(2)]
  for d in dirs:
    os.makedirs(d)
  _, results = sweep.train_population(configs, dirs)
  alone = deepflow.train_and_evaluate(configs[1], str(tmp_path / "alone"))
  assert results[1]["metrics"] == pytest.approx(alone, rel=1e-4, abs=1e-5)
  assert results[0]["metrics"]["loss"] != pytest.approx(alone["loss"], rel=1e-3)
