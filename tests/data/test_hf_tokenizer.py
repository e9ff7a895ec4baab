"""Hugging Face tokenizers (``data.tokenizer='hf:DIR'``) against the ``tokenizers`` library and
what ``transformers`` read from the same directories (``tools/make_hf_tokenizers.py``): ids and
decodings on thousands of strings of the bundled text and unicode, the special tokens from each
file a model directory may declare them in, the workdir's copy, and one-line errors."""
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import tokenizers as hf

from deepflow.data import hf_tokenizer, packing, tokenizers
from deepflow.data.bundled.text import corpus
from deepflow.registry import ConfigError

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "hf_tokenizers")
NAMES = ("gpt2_bpe", "llama_bpe")
UNICODE = [
    "naïve café, déjà vu, Ærøskøbing", "日本語のテキストと漢字", "한국어 문장", "Ελληνικά κείμενα",
    "עברית מימין לשמאל", "العربية", "emoji 🤖🚀 and a family 👩‍👩‍👧 (ZWJ)", "e\u0301 combining",
    "\u00a0no-break\u2009thin\u3000ideographic spaces", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 astral plane", "∑∫√∞ ≠ ≤",
    "tab\tand\r\nCRLF\x0bvertical", "  leading spaces", "trailing  ", "", " ", "\n\n\n",
    "NUL \x00 inside", "<|endoftext|> as text", "<s> and </s> as text", "▁ a literal metaspace",
    "<0x41> as text", "a" * 500,
]


def directory(name: str) -> str:
  return os.path.join(FIXTURES, name)


def library(name: str) -> hf.Tokenizer:
  return hf.Tokenizer.from_file(os.path.join(directory(name), "tokenizer.json"))


@pytest.fixture(scope="module")
def strings() -> list[str]:
  """About 3,800 strings: every paragraph of the help topics, seeded random slices of them
  (cut mid-word and mid-line), and unicode, alone and mixed into the text."""
  text = corpus()
  rng = np.random.default_rng(0)
  paragraphs = [p for p in text.split("\n\n") if p.strip()]
  starts = rng.integers(0, len(text) - 400, 1000)
  slices = [text[s:s + n] for s, n in zip(starts, rng.integers(1, 400, 1000))]
  codepoints = np.concatenate([np.arange(0x20, 0xD800), np.arange(0xE000, 0x30000)])
  random_unicode = ["".join(map(chr, rng.choice(codepoints, rng.integers(1, 40))))
                    for _ in range(200)]
  mixed = [f"{slices[i][:60]}{u}{slices[i + 1][:60]}" for i, u in enumerate(UNICODE)]
  return paragraphs + slices + UNICODE + random_unicode + mixed


@pytest.mark.parametrize("name", NAMES)
def test_ids_and_decoding_equal_the_library(name, strings):
  """deepflow's ids are the library's (no special tokens added: packing adds BOS and EOS), its
  decoding is the library's, and a packed document starts as the tokenizer's own template."""
  assert len(strings) > 3000
  ours = tokenizers.load_or_build(f"hf:{directory(name)}", None, lambda n: [])
  reference = library(name)
  ids = ours.encode(strings)
  expected = [e.ids for e in reference.encode_batch(strings, add_special_tokens=False)]
  assert ids == expected
  assert [ours.decode(i) for i in ids] == [reference.decode(i) for i in expected]
  if name == "gpt2_bpe":  # byte-level: lossless except the special token's text
    assert all(ours.decode(i) == s for i, s in zip(ids, strings) if "<|endoftext|>" not in s)
  else:  # Llama's template adds <s>: the packed inputs [BOS, tokens] are exactly that
    inputs, targets = packing.document_pairs(ids[0], ours.bos, ours.eos)
    assert inputs.tolist() == reference.encode(strings[0]).ids
    assert targets[-1] == reference.token_to_id("</s>")
  assert len({len(i) for i in ids}) > 100 and max(max(i) for i in ids if i) < ours.vocab_size


@pytest.mark.parametrize("name", NAMES)
def test_special_tokens_and_samples_equal_what_transformers_reads(name):
  with open(os.path.join(directory(name), "transformers_reference.json")) as f:
    reference = json.load(f)
  ours = hf_tokenizer.load(directory(name))
  assert (ours.bos, ours.eos, ours.pad) == (reference["bos_token_id"], reference["eos_token_id"],
                                            reference["pad_token_id"])
  assert ours.vocab_size == reference["len"] == tokenizers.vocab_size(f"hf:{directory(name)}")
  for sample in reference["samples"]:
    ids = ours.encode([sample["text"]])[0]
    assert ids == sample["ids"]
    assert ours.decode(ids) == sample["decoded"]
    with_template = sample["ids_with_special_tokens"]
    assert with_template in (ids, [ours.bos, *ids])  # GPT-2 adds nothing, Llama adds <s>


def model_directory(tmp_path, name="llama_bpe", **files) -> str:
  """A copy of a fixture's tokenizer.json with the given JSON files (dicts) or raw texts."""
  target = tmp_path / "model"
  target.mkdir()
  shutil.copy(os.path.join(directory(name), "tokenizer.json"), target)
  for file, value in files.items():
    text = value if isinstance(value, str) else json.dumps(value)
    (target / f"{file}.json").write_text(text)
  return str(target)


def test_special_tokens_come_from_each_file_in_turn(tmp_path):
  """tokenizer_config.json first, then special_tokens_map.json, then config.json's ids (a list
  gives its first); without a BOS the EOS starts documents (Qwen2, GPT-2 style)."""
  d = model_directory(tmp_path, tokenizer_config={"eos_token": "</s>", "pad_token": None},
                      special_tokens_map={"bos_token": {"content": "<s>"}, "eos_token": "<unk>",
                                          "pad_token": "<unk>"},
                      config={"bos_token_id": 0, "eos_token_id": [0, 1], "pad_token_id": 2})
  tok = hf_tokenizer.load(d)
  assert (tok.bos, tok.eos, tok.pad) == (1, 2, 0)
  os.remove(os.path.join(d, "special_tokens_map.json"))
  os.remove(os.path.join(d, "tokenizer_config.json"))
  tok = hf_tokenizer.load(d)
  assert (tok.bos, tok.eos, tok.pad) == (0, 0, 2)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump({"eos_token_id": 2, "pad_token_id": -1}, f)  # -1: none, as older configs say
  tok = hf_tokenizer.load(d)
  assert (tok.bos, tok.eos, tok.pad) == (2, 2, None)


def test_a_truncation_or_padding_in_the_file_is_not_applied_nor_pickled(tmp_path):
  data = json.loads(open(os.path.join(directory("gpt2_bpe"), "tokenizer.json")).read())
  data["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst",
                        "stride": 0}
  data["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None,
                     "pad_id": 0, "pad_type_id": 0, "pad_token": "!"}
  d = model_directory(tmp_path, "gpt2_bpe", tokenizer_config={"eos_token": "<|endoftext|>"})
  with open(os.path.join(d, "tokenizer.json"), "w") as f:
    json.dump(data, f)
  text = corpus()[:2000]
  expected = library("gpt2_bpe").encode(text, add_special_tokens=False).ids
  ours = hf_tokenizer.load(d)
  assert ours.encode([text])[0] == expected
  assert pickle.loads(pickle.dumps(ours)).encode([text])[0] == expected  # as data.workers get it


def test_the_workdir_copy_reads_back_alike_without_the_original(tmp_path, strings):
  """The run's copy (tokenizer.json as read, tokenizer_config.json naming the resolved tokens)
  gives the same ids once the model directory is gone, and wins over a later spec."""
  d = model_directory(tmp_path, "gpt2_bpe", config={"bos_token_id": 1000, "eos_token_id": 1000})
  workdir = str(tmp_path / "run")
  first = tokenizers.load_or_build(f"hf:{d}", workdir, lambda n: [])
  shutil.rmtree(d)
  copy = os.path.join(workdir, tokenizers.HF_TOKENIZER_DIR)
  assert sorted(os.listdir(workdir)) == [tokenizers.HF_TOKENIZER_DIR]
  with open(os.path.join(copy, "tokenizer_config.json")) as f:
    assert json.load(f) == {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                            "pad_token": None}
  again = tokenizers.load_or_build(f"hf:{directory('llama_bpe')}", workdir, lambda n: [])
  assert (again.bos, again.eos, again.pad, again.vocab_size) == (1000, 1000, None, 1001)
  assert tokenizers.vocab_size(f"hf:{d}", workdir) == 1001
  assert again.encode(strings[:500]) == first.encode(strings[:500])
  assert tokenizers.hf_spec(copy) == f"hf:{copy}" and tokenizers.hf_spec(workdir) is None


@pytest.mark.parametrize("files, message", [
    ({}, r"data.tokenizer='hf:.*/nowhere': .*/nowhere/tokenizer.json not found \(no directory\)"),
    ({"tokenizer": "{\"model\": 3"}, r"/tokenizer.json is not a Hugging Face tokenizer"),
    ({"tokenizer_config": "{bad"}, r"/tokenizer_config.json is not valid JSON"),
    ({"tokenizer_config": "[1]"}, r"/tokenizer_config.json must hold a JSON object"),
    ({"tokenizer_config": {"eos_token": "<eos>"}},
     r"/tokenizer_config.json: eos_token '<eos>' is not a token of tokenizer.json; name one of "
     r"its tokens \(special ones: '<unk>', '<s>', '</s>'\)"),
    ({"special_tokens_map": {"eos_token": "</s>", "pad_token": {"content": "[PAD]"}}},
     r"/special_tokens_map.json: pad_token '\[PAD\]' is not a token"),
    ({"config": {"eos_token_id": 1000}}, r"/config.json: eos_token_id=1000 is not an id of "
                                         r"tokenizer.json \(0..999\)"),
    ({"config": {"bos_token_id": 1}}, r"declares no EOS token .* add one to .*/model/"
                                      r"tokenizer_config.json"),
])
def test_bad_directories_fail_in_one_line_naming_the_file(tmp_path, files, message):
  if files:
    d = model_directory(tmp_path, **{k: v for k, v in files.items() if k != "tokenizer"})
    if "tokenizer" in files:
      with open(os.path.join(d, "tokenizer.json"), "w") as f:
        f.write(files["tokenizer"])
  else:
    d = str(tmp_path / "nowhere")
  with pytest.raises(ConfigError, match=message) as error:
    tokenizers.load_or_build(f"hf:{d}", str(tmp_path / "run"), lambda n: [])
  assert "\n" not in str(error.value)
  assert not os.path.exists(tmp_path / "run")  # nothing written


def test_a_directory_with_only_a_sentencepiece_model_is_pointed_to_it(tmp_path):
  (tmp_path / "tokenizer.model").write_bytes(b"")
  with pytest.raises(ConfigError, match=r"it has tokenizer.model: use data.tokenizer="
                                        r"'sentencepiece:.*/tokenizer.model'"):
    hf_tokenizer.load(str(tmp_path))


def test_a_tokenizer_larger_than_the_model_is_refused():
  spec = f"hf:{directory('gpt2_bpe')}"
  tokenizers.check_fits(spec, 1001, 0)     # 0: the model takes the tokenizer's size
  tokenizers.check_fits(spec, 1001, 1024)  # a padded vocabulary holds it
  with pytest.raises(ConfigError, match=r"gpt2_bpe/tokenizer.json has 1001 ids, more than "
                                        r"model.vocab_size=1000; tokenize with the model's "
                                        r"own tokenizer, or give the model a vocabulary of "
                                        r">= 1001 ids"):
    tokenizers.check_fits(spec, 1001, 1000)
