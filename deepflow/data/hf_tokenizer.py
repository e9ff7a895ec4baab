"""Hugging Face tokenizers (``data.tokenizer='hf:DIR'``): a model directory's ``tokenizer.json``,
read and run by the ``tokenizers`` library, with the special ids the directory declares.

Ids and decoding are the library's own (``encode(text, add_special_tokens=False)``,
``decode(ids)`` without special tokens): deepflow adds BOS and EOS itself when it packs a
document (``deepflow.data.packing``), so a template the tokenizer would add (Llama's ``<s>``) is
not added twice. The special tokens come from, in order, ``tokenizer_config.json``,
``special_tokens_map.json`` (``bos_token``, ``eos_token``, ``pad_token``: a token string or an
``AddedToken`` dict) and ``config.json`` (``bos_token_id``, ...), as ``transformers`` reads them; a
tokenizer without a BOS (Qwen2) starts documents with its EOS, the document separator it was
trained with (GPT-2's ``<|endoftext|>`` is both). A run keeps ``files()`` in its workdir:
``tokenizer.json`` as read beside a ``tokenizer_config.json`` naming the resolved tokens, a copy
that gives the same ids and special tokens, read by deepflow or by ``transformers``.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

from etils import epath

from deepflow.registry import ConfigError, first_line

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
MODEL_CONFIG = "config.json"
SPECIAL = ("bos", "eos", "pad")


def _read_settings(directory: epath.Path, name: str) -> dict[str, Any]:
  """A JSON object file of the directory, or {} when there is none."""
  path = directory / name
  if not path.exists():
    return {}
  try:
    value = json.loads(path.read_text(encoding="utf-8"))
  except ValueError as e:
    raise ConfigError(f"{path} is not valid JSON ({first_line(e)}); repair or remove it") from e
  if not isinstance(value, dict):
    raise ConfigError(f"{path} must hold a JSON object, got {type(value).__name__}")
  return value


def _token_content(value: Any) -> str | None:
  """A special token as ``tokenizer_config.json`` writes it: a string or an AddedToken dict."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) and value else None


class HfTokenizer:
  """A ``tokenizers.Tokenizer`` and its BOS, EOS and padding ids (``pad`` None when none is
  declared); ``vocab_size`` is its largest id + 1, added tokens included."""

  def __init__(self, tokenizer_json: str, settings: Mapping[str, Mapping[str, Any]],
               origin: str):
    import tokenizers
    self.origin = origin
    try:
      self.tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # the library's parse errors carry no common type
      raise ConfigError(f"{origin}/{TOKENIZER_JSON} is not a Hugging Face tokenizer "
                        f"({first_line(e)}); point data.tokenizer='hf:DIR' at a directory "
                        f"saved by tokenizers or transformers") from e
    self.tokenizer.no_truncation()  # a document is tokenized whole, whatever the file says
    self.tokenizer.no_padding()
    self.json = tokenizer_json
    self.config = dict(settings.get(TOKENIZER_CONFIG, {}))
    self.vocab_size = max(self.tokenizer.get_vocab(with_added_tokens=True).values(),
                          default=-1) + 1
    ids = {name: self._declared(name, settings) for name in SPECIAL}
    if ids["eos"] is None:
      raise ConfigError(f"{origin} declares no EOS token (eos_token in {TOKENIZER_CONFIG} or "
                        f"{SPECIAL_TOKENS_MAP}, eos_token_id in {MODEL_CONFIG}); add one to "
                        f"{origin}/{TOKENIZER_CONFIG}, e.g. \"eos_token\": \"</s>\"")
    self.eos, self.pad = ids["eos"], ids["pad"]
    self.bos = ids["eos"] if ids["bos"] is None else ids["bos"]

  def _declared(self, name: str, settings: Mapping[str, Mapping[str, Any]]) -> int | None:
    """The id of the ``name`` token: a token named by the tokenizer's settings, else an id of
    the model's ``config.json``, else None."""
    for file in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
      token = _token_content(settings.get(file, {}).get(f"{name}_token"))
      if token is not None:
        found = self.tokenizer.token_to_id(token)
        if found is None:
          raise ConfigError(f"{self.origin}/{file}: {name}_token {token!r} is not a token of "
                            f"{TOKENIZER_JSON}; name one of its tokens (special ones: "
                            f"{self._special_tokens()})")
        return found
    value = settings.get(MODEL_CONFIG, {}).get(f"{name}_token_id")
    value = value[0] if isinstance(value, list) and value else value
    if value is None or value == [] or (isinstance(value, int) and value < 0):
      return None  # some configs say -1 for "none"
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.vocab_size:
      raise ConfigError(f"{self.origin}/{MODEL_CONFIG}: {name}_token_id={value!r} is not an id "
                        f"of {TOKENIZER_JSON} (0..{self.vocab_size - 1}); fix it, or name the "
                        f"token as {name}_token in {TOKENIZER_CONFIG}")
    return value

  def _special_tokens(self, shown: int = 8) -> str:
    added = sorted(self.tokenizer.get_added_tokens_decoder().items())
    names = [repr(token.content) for _, token in added if token.special]
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "") or "none"

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.tokenizer.encode_batch_fast(list(texts),
                                                            add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def files(self) -> dict[str, str]:
    """What a run keeps in its workdir: ``tokenizer.json`` as read, and ``tokenizer_config.json``
    with the resolved special tokens, so the copy needs none of the other files."""
    config = dict(self.config)
    for name in SPECIAL:
      token_id = getattr(self, name)
      config[f"{name}_token"] = None if token_id is None else self.tokenizer.id_to_token(token_id)
    return {TOKENIZER_JSON: self.json, TOKENIZER_CONFIG: json.dumps(config, indent=2) + "\n"}


def load(directory: str) -> HfTokenizer:
  """The tokenizer of a Hugging Face model directory, or a one-line error naming the fix."""
  directory = os.path.expanduser(directory)
  root = epath.Path(directory)
  path = root / TOKENIZER_JSON
  if not path.exists():
    what = "no directory" if not root.exists() else f"no {TOKENIZER_JSON} in it"
    hint = (f"; it has tokenizer.model: use data.tokenizer='sentencepiece:{root}/tokenizer.model'"
            if (root / "tokenizer.model").exists() else
            " (download the model's tokenizer files too, e.g. `huggingface-cli download NAME "
            "--local-dir DIR`)")
    raise ConfigError(f"data.tokenizer='hf:{directory}': {path} not found ({what}){hint}")
  settings = {name: _read_settings(root, name)
              for name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, MODEL_CONFIG)}
  return HfTokenizer(path.read_text(encoding="utf-8"), settings, directory)
