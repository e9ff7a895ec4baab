"""Tokenizers for text datasets (``data.tokenizer``): UTF-8 bytes, SentencePiece subwords, or a
Hugging Face model's own tokenizer.

``data.tokenizer`` names one:

  'byte'                     UTF-8 bytes, no training (259 ids: padding, BOS, EOS, 256 bytes)
  'hf:DIR'                   a Hugging Face ``tokenizer.json`` and its special tokens
                             (``deepflow.data.hf_tokenizer``)
  'sentencepiece:PATH'       a trained SentencePiece model file (``.model``)
  'sentencepiece:bpe:N'      a SentencePiece model of ``N`` pieces trained on the train split
  'sentencepiece:unigram:N'  (a seeded sample of its documents) before the first step

Whatever the kind, the tokenizer a run uses is written to its workdir (``tokenizer.model``; a
Hugging Face one as the directory ``hf_tokenizer/``) on first use and read back from there
afterwards, so resumption, ``eval`` and ``sample`` tokenize exactly as training did, even if
PATH or DIR changes. Trained models are lossless (byte fallback, no normalization):
``decode(encode(text)) == text``.
"""
from __future__ import annotations

import io
import os
from typing import Callable, Iterable, Sequence

import numpy as np
from etils import epath

from deepflow.atomic import write_atomic
from deepflow.data import hf_tokenizer
from deepflow.registry import ConfigError

TOKENIZER_FILE = "tokenizer.model"
HF_TOKENIZER_DIR = "hf_tokenizer"  # in the workdir: tokenizer.json and tokenizer_config.json
PAD = 0                            # every tokenizer here: id 0 is padding, never a real token
SENTENCEPIECE_KINDS = ("bpe", "unigram")
# Training reads at most this many documents of the train split (a seeded sample): enough for a
# subword vocabulary of tens of thousands, and a bounded cost whatever the corpus size.
TRAIN_SAMPLE_DOCS = 200_000


class ByteTokenizer:
  """UTF-8 bytes: id = byte + 3; 0 padding, 1 BOS, 2 EOS."""
  vocab_size, bos, eos = 259, 1, 2

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    return [[b + 3 for b in text.encode("utf-8")] for text in texts]

  def decode(self, ids: Iterable[int]) -> str:
    return bytes(i - 3 for i in map(int, ids) if i >= 3).decode("utf-8", errors="replace")

  def serialized(self) -> bytes:
    return b"byte"


class SentencePieceTokenizer:
  """A SentencePiece model (its serialized proto); BOS and EOS are the model's own ids."""

  def __init__(self, proto: bytes, origin: str):
    import sentencepiece
    try:
      self.processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
    except Exception as e:  # a file that is not a SentencePiece model
      raise ConfigError(f"{origin} is not a SentencePiece model ({str(e).splitlines()[0]})") from e
    self.proto = proto
    self.vocab_size = self.processor.vocab_size()
    self.bos, self.eos = self.processor.bos_id(), self.processor.eos_id()
    if min(self.bos, self.eos) < 1:
      raise ConfigError(f"SentencePiece model {origin} needs BOS and EOS ids other than 0 (the "
                        f"padding id), got bos={self.bos}, eos={self.eos}")

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    return self.processor.encode(list(texts))

  def decode(self, ids: Iterable[int]) -> str:
    return self.processor.decode([int(i) for i in ids if int(i) not in (PAD, self.bos,
                                                                        self.eos)])

  def serialized(self) -> bytes:
    return self.proto


Tokenizer = ByteTokenizer | SentencePieceTokenizer | hf_tokenizer.HfTokenizer


def parse(spec: str) -> tuple[str, str | int]:
  """('byte', ''), ('path', PATH), ('hf', DIR) or ('bpe' / 'unigram', N) from a
  ``data.tokenizer`` value."""
  if spec == "byte":
    return "byte", ""
  kind, sep, rest = spec.partition(":")
  if kind not in ("sentencepiece", "hf") or not sep or not rest:
    raise ConfigError(f"data.tokenizer {spec!r} must be 'byte', 'hf:DIR', 'sentencepiece:PATH' "
                      f"or 'sentencepiece:{{bpe,unigram}}:VOCAB_SIZE'")
  if kind == "hf":
    return "hf", rest
  model, sep, size = rest.partition(":")
  if model in SENTENCEPIECE_KINDS and sep:
    if not size.isdigit() or int(size) < 8:
      raise ConfigError(f"data.tokenizer {spec!r}: the vocabulary size must be an integer >= 8")
    return model, int(size)
  return "path", rest


def vocab_size(spec: str, workdir: str | None = None) -> int:
  """The vocabulary size a spec gives, without reading any data (a file spec reads the file;
  the tokenizer saved in ``workdir``, when there is one, is the run's and wins)."""
  kept = from_workdir(workdir)
  if kept is not None:
    return kept.vocab_size
  kind, arg = parse(spec)
  if kind == "byte":
    return ByteTokenizer.vocab_size
  if kind == "path":
    return _from_file(str(arg)).vocab_size
  if kind == "hf":
    return hf_tokenizer.load(str(arg)).vocab_size
  return int(arg)


def check_fits(spec: str, size: int, model_vocab: int, model_origin: str = "model.vocab_size"
               ) -> None:
  """One line when the tokenizer's ``size`` ids do not fit a model's declared vocabulary
  (``model_vocab`` > 0; a larger one, padded as many checkpoints are, is fine)."""
  if 0 < model_vocab < size:
    kind, arg = parse(spec)
    where = os.path.join(os.path.expanduser(str(arg)), hf_tokenizer.TOKENIZER_JSON
                         ) if kind == "hf" else "it"
    raise ConfigError(f"data.tokenizer {spec!r}: {where} has {size} ids, more than "
                      f"{model_origin}={model_vocab}; tokenize with the model's own tokenizer, "
                      f"or give the model a vocabulary of >= {size} ids")


def hf_spec(directory: str) -> str | None:
  """``'hf:DIR'`` when ``directory`` holds a Hugging Face tokenizer (``tokenizer.json``), else
  None: the ``data.tokenizer`` a checkpoint directory brings with it."""
  found = (epath.Path(os.path.expanduser(directory)) / hf_tokenizer.TOKENIZER_JSON).exists()
  return f"hf:{directory}" if found else None


def _from_file(path: str) -> SentencePieceTokenizer:
  path = os.path.expanduser(path)
  if not epath.Path(path).exists():
    raise ConfigError(f"SentencePiece model {path} not found (data.tokenizer)")
  return SentencePieceTokenizer(epath.Path(path).read_bytes(), path)


def train_sentencepiece(texts: Iterable[str], kind: str, size: int) -> SentencePieceTokenizer:
  """A SentencePiece model of ``size`` pieces trained on ``texts``: lossless (identity
  normalization, whitespace kept, unknown characters as bytes), ids 0 pad, 1 unk, 2 BOS, 3 EOS."""
  import sentencepiece
  writer = io.BytesIO()
  try:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=writer, vocab_size=size, model_type=kind,
        pad_id=PAD, unk_id=1, bos_id=2, eos_id=3, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=1 << 16,
        num_threads=1, minloglevel=2)  # one thread: the same model from the same sample
  except RuntimeError as e:  # e.g. a vocabulary larger than the text can fill
    raise ConfigError(f"training a SentencePiece {kind} tokenizer of {size} pieces failed: "
                      f"{str(e).splitlines()[0]}") from e
  return SentencePieceTokenizer(writer.getvalue(), f"the trained {kind} model")


def from_bytes(data: bytes, origin: str) -> Tokenizer:
  return ByteTokenizer() if data == b"byte" else SentencePieceTokenizer(data, origin)


def from_workdir(workdir: str | None) -> Tokenizer | None:
  """The tokenizer a run saved in ``workdir``, or None."""
  if not workdir:
    return None
  path, directory = epath.Path(workdir) / TOKENIZER_FILE, epath.Path(workdir) / HF_TOKENIZER_DIR
  if path.exists():
    return from_bytes(path.read_bytes(), str(path))
  if directory.exists():
    return hf_tokenizer.load(str(directory))
  return None


def load_or_build(spec: str, workdir: str | None,
                  sample_texts: Callable[[int], Iterable[str]]) -> Tokenizer:
  """The run's tokenizer: the one saved in ``workdir`` if any, else built from ``spec`` (a
  trained one from ``sample_texts(TRAIN_SAMPLE_DOCS)``) and saved there (process 0)."""
  kept = from_workdir(workdir)
  if kept is not None:
    return kept
  saved = epath.Path(workdir) / TOKENIZER_FILE if workdir else None
  kind, arg = parse(spec)
  if kind == "byte":
    tokenizer: Tokenizer = ByteTokenizer()
  elif kind == "path":
    tokenizer = _from_file(str(arg))
  elif kind == "hf":
    tokenizer = hf_tokenizer.load(str(arg))
  else:
    tokenizer = train_sentencepiece(sample_texts(TRAIN_SAMPLE_DOCS), kind, int(arg))
  if saved is not None:
    import jax
    if jax.process_index() == 0:
      saved.parent.mkdir(parents=True, exist_ok=True)
      if isinstance(tokenizer, hf_tokenizer.HfTokenizer):
        _save_directory(tokenizer.files(), saved.parent / HF_TOKENIZER_DIR)
      else:
        write_atomic(saved, tokenizer.serialized())  # whole or absent: never half a model
  return tokenizer


def _save_directory(files: dict[str, str], directory: epath.Path) -> None:
  """Text files written into a temporary directory renamed to ``directory``: all or none."""
  tmp = epath.Path(f"{directory}.tmp")
  if tmp.exists():  # left by a crash before the rename
    tmp.rmtree()
  tmp.mkdir()
  for name, text in files.items():
    (tmp / name).write_bytes(text.encode("utf-8"))
  tmp.rename(directory)


def as_text(value) -> str:
  """A TFDS text feature (bytes or str, possibly a 0-d numpy array) as str."""
  value = value.item() if isinstance(value, np.ndarray) else value
  return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
