"""Encoding speed of ``data.tokenizer='hf:DIR'`` against the ``tokenizers`` library itself and
against deepflow's SentencePiece tokenizer, side by side in one run.

The text is every paragraph of the bundled help topics (about 3,000 documents, 0.46 MB); the
Hugging Face tokenizers are the committed fixtures (``tools/make_hf_tokenizers.py``: byte-level
BPE of 1,001 ids, GPT-2 style, and a Llama-style BPE with byte fallback of 1,000), the
SentencePiece one a BPE of 1,000 pieces trained here on the same paragraphs. Each contender
encodes the whole text once per round, in turn, for ``--rounds`` rounds; the median counts.

    python benchmarks/hf_tokenizer.py [--rounds 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import tokenizers as hf

from deepflow.data import hf_tokenizer, tokenizers
from deepflow.data.bundled.text import corpus
from dp_step import cpu_name  # noqa: E402  (benchmarks/ is the script's directory)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf_tokenizers")


def contenders(texts: list[str]) -> dict:
  """name -> a function encoding ``texts``."""
  out = {}
  for name in ("gpt2_bpe", "llama_bpe"):
    ours = hf_tokenizer.load(os.path.join(FIXTURES, name))
    library = hf.Tokenizer.from_file(os.path.join(FIXTURES, name, "tokenizer.json"))
    out[f"deepflow hf:{name}"] = lambda ours=ours: ours.encode(texts)
    out[f"tokenizers encode_batch {name}"] = lambda library=library: library.encode_batch(
        texts, add_special_tokens=False)
    out[f"tokenizers encode (one by one) {name}"] = lambda library=library: [
        library.encode(t, add_special_tokens=False) for t in texts]
  sentencepiece = tokenizers.train_sentencepiece(texts, "bpe", 1000)
  out["deepflow sentencepiece:bpe:1000"] = lambda: sentencepiece.encode(texts)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=7)
  args = parser.parse_args()
  texts = [p for p in corpus().split("\n\n") if p.strip()]
  megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
  runs = contenders(texts)
  times: dict[str, list[float]] = {name: [] for name in runs}
  for _ in range(args.rounds):
    for name, run in runs.items():
      started = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - started)
  print(f"{cpu_name()}, {os.cpu_count()} CPUs, load {os.getloadavg()}; {len(texts)} documents, "
        f"{megabytes:.2f} MB, median of {args.rounds} rounds")
  for name, seconds in times.items():
    median = statistics.median(seconds)
    print(f"  {name:45s} {median * 1e3:8.1f} ms  {megabytes / median:6.1f} MB/s")


if __name__ == "__main__":
  main()
