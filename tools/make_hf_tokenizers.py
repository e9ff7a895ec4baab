"""Writes tests/fixtures/hf_tokenizers/{gpt2_bpe,llama_bpe}/, once: two small Hugging Face
tokenizers trained with the ``tokenizers`` library on the bundled text (Python's help topics),
laid out as a model directory has them (``tokenizer.json``, ``tokenizer_config.json``), and what
``transformers`` reads from each directory (``transformers_reference.json``: the special ids and
the ids and decodings of a few strings), so ``tests/data/test_hf_tokenizer.py`` checks
deepflow's reading of the special tokens against ``transformers`` without importing it.

    python tools/make_hf_tokenizers.py

- ``gpt2_bpe``: GPT-2's layout. Byte-level BPE (ByteLevel pre-tokenizer and decoder: every
  string is encoded, nothing is unknown) of 1,000 ids, then ``<|endoftext|>`` as the last id,
  the BOS, EOS and unknown token of ``tokenizer_config.json`` (plain strings).
- ``llama_bpe``: Llama 2's layout, as ``transformers`` converts a SentencePiece model. ``<unk>``,
  ``<s>``, ``</s>`` at ids 0-2, the 256 byte tokens ``<0x00>``..``<0xFF>`` at 3-258 (byte
  fallback for characters the vocabulary lacks), BPE pieces after them; a Metaspace
  pre-tokenizer (``▁`` for spaces, one prepended to the text), the Replace / ByteFallback / Fuse
  / Strip decoder, and a template that adds ``<s>``. Special tokens as ``AddedToken`` dicts.
"""
import json
import os
import sys

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers import trainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from deepflow.data.bundled.text import corpus  # noqa: E402  (after the path is set)

OUT = os.path.join(ROOT, "tests", "fixtures", "hf_tokenizers")
VOCAB = 1000
SAMPLES = ["The for statement is used to iterate over the elements of a sequence.",
           "  leading spaces, tabs\tand\r\nline ends  ", "naïve café, 日本語, emoji 🤖",
           "<|endoftext|> and <s> inside text", ""]


def documents() -> list[str]:
  return [p for p in corpus().split("\n\n") if p.strip()]


def gpt2_style() -> tuple[Tokenizer, dict]:
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(documents(), trainer)
  tokenizer.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
  config = {"add_prefix_space": False, "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
            "model_max_length": 1024, "tokenizer_class": "GPT2Tokenizer"}
  return tokenizer, config


def added(content: str) -> dict:
  return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
          "rstrip": False, "single_word": False}


def llama_style() -> tuple[Tokenizer, dict]:
  specials = ["<unk>", "<s>", "</s>"]
  metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
  trained = Tokenizer(models.BPE(unk_token="<unk>"))
  trained.pre_tokenizer = metaspace
  trainer = trainers.BpeTrainer(vocab_size=VOCAB - 256, show_progress=False,
                                special_tokens=specials)
  trained.train_from_iterator(documents(), trainer)
  # Renumbered as Llama's: specials, then the byte tokens, then the trained pieces in order.
  pieces = sorted(trained.get_vocab().items(), key=lambda item: item[1])
  order = specials + [f"<0x{b:02X}>" for b in range(256)] + [p for p, _ in pieces
                                                             if p not in specials]
  merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
            for m in json.loads(trained.to_str())["model"]["merges"]]
  tokenizer = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(order)}, merges=merges,
                                   unk_token="<unk>", byte_fallback=True, fuse_unk=True))
  tokenizer.pre_tokenizer = metaspace
  tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
  tokenizer.post_processor = processors.TemplateProcessing(
      single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
  tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
  config = {"add_bos_token": True, "add_eos_token": False, "bos_token": added("<s>"),
            "eos_token": added("</s>"), "unk_token": added("<unk>"), "pad_token": None,
            "legacy": False, "clean_up_tokenization_spaces": False,
            "model_max_length": 2048, "tokenizer_class": "PreTrainedTokenizerFast"}
  return tokenizer, config


def reference(directory: str) -> dict:
  """What ``transformers`` reads from the directory."""
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(directory)
  return {
      "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
      "pad_token_id": tok.pad_token_id, "len": len(tok),
      "samples": [{"text": s, "ids": tok(s, add_special_tokens=False)["input_ids"],
                   "ids_with_special_tokens": tok(s)["input_ids"],
                   "decoded": tok.decode(tok(s, add_special_tokens=False)["input_ids"],
                                         skip_special_tokens=True)} for s in SAMPLES],
  }


def main():
  for name, make in (("gpt2_bpe", gpt2_style), ("llama_bpe", llama_style)):
    directory = os.path.join(OUT, name)
    os.makedirs(directory, exist_ok=True)
    tokenizer, config = make()
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
      json.dump(config, f, indent=2)
      f.write("\n")
    with open(os.path.join(directory, "transformers_reference.json"), "w") as f:
      json.dump(reference(directory), f, indent=1, ensure_ascii=False)
      f.write("\n")
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    print(f"{directory}: {tokenizer.get_vocab_size(with_added_tokens=True)} ids, {size:,} bytes")


if __name__ == "__main__":
  main()
