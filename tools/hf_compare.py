"""deepflow against ``transformers`` itself, live: random-initialised models of each supported
family, at sizes beyond the test fixtures (SmolLM-135M's width, Llama 3 rope scaling, a
Mistral window shorter than the sequence, ...), saved by ``transformers`` and loaded with
``deepflow.load_pretrained``; then written back by deepflow and loaded by ``transformers``.

    python tools/hf_compare.py [--length 128] [--only NAME ...]

Per config it prints the largest |logit difference| (float32, batch 2 x ``length`` tokens) of
(1) deepflow on transformers' checkpoint vs transformers, (2) transformers on deepflow's export
vs deepflow, whether 32 greedy tokens after a 16-token prompt equal ``generate``'s, and the
logits' scale. Needs torch and transformers (not deepflow's dependencies).
"""
from __future__ import annotations

import argparse
import os
import tempfile

import jax
import numpy as np
import torch
import transformers

import deepflow
from deepflow.hf.export import write_pretrained
from deepflow.models import decoding

SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5,
            tie_word_embeddings=True, rope_theta=10000.0)
CONFIGS = {
    "gpt2 (768 wide, 4 layers)": (transformers.GPT2Config,
                                  dict(n_embd=768, n_head=12, n_layer=4, n_positions=1024)),
    "smollm-135m width, 4 layers": (transformers.LlamaConfig, dict(SMOL, num_hidden_layers=4)),
    "llama3.2 rope llama3, GQA 8/2": (transformers.LlamaConfig, dict(
        vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=64))),
    "tinyllama shape, rope linear x4": (transformers.LlamaConfig, dict(
        vocab_size=32000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=1, max_position_embeddings=2048,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "mistral, window 48 < 128": (transformers.MistralConfig, dict(
        vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, sliding_window=48, head_dim=32)),
    "qwen2.5 biases, GQA 7/1": (transformers.Qwen2Config, dict(
        vocab_size=8192, hidden_size=448, intermediate_size=1216, num_hidden_layers=4,
        num_attention_heads=7, num_key_value_heads=1, tie_word_embeddings=True,
        rope_theta=1000000.0)),
    "qwen3 q/k norm, head_dim 64": (transformers.Qwen3Config, dict(
        vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, rope_theta=1000000.0)),
}


def logits_of(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(tokens).long()).logits.numpy()


def compare(config_cls, fields: dict, length: int, root: str) -> dict:
  torch.manual_seed(0)
  config = config_cls(**fields)
  reference = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  reference.generation_config.eos_token_id = None
  reference.generation_config.pad_token_id = 0
  source, exported = os.path.join(root, "hf"), os.path.join(root, "deepflow")
  reference.save_pretrained(source, max_shard_size="20MB")  # sharded past 20 MB
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, length)).astype(np.int32)
  expected = logits_of(reference, tokens)
  model, variables = deepflow.load_pretrained(source)
  ours = np.asarray(jax.jit(model.apply)(variables, tokens))
  prompt = tokens[:, :16]
  with torch.no_grad():
    greedy = reference.generate(torch.from_numpy(prompt).long(), attention_mask=torch.ones(
        prompt.shape), max_new_tokens=32, do_sample=False).numpy()
  sampled = decoding.sample(model, variables, prompt, 32, jax.random.PRNGKey(0), temperature=0)
  write_pretrained(model, variables, exported, max_shard_bytes=20 * 2 ** 20)
  back = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
  return {"in": float(np.abs(ours - expected).max()),
          "out": float(np.abs(logits_of(back, tokens) - ours).max()),
          "greedy": bool((np.asarray(sampled) == greedy).all()),
          "scale": float(np.abs(expected).max()),
          "params": sum(p.numel() for p in reference.parameters())}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--only", nargs="*", default=None, help="config names (prefixes)")
  args = parser.parse_args(argv)
  transformers.logging.set_verbosity_error()
  print("| config | parameters | max error in (deepflow vs transformers) | max error out "
        "(transformers on deepflow's export) | max logit | 32 greedy tokens equal |")
  print("|---|---|---|---|---|---|")
  for name, (config_cls, fields) in CONFIGS.items():
    if args.only and not any(name.startswith(o) for o in args.only):
      continue
    with tempfile.TemporaryDirectory() as root:
      r = compare(config_cls, fields, args.length, root)
    print(f"| {name} | {r['params'] / 1e6:.1f} M | {r['in']:.1e} | {r['out']:.1e} | "
          f"{r['scale']:.2f} | {'yes' if r['greedy'] else 'NO'} |", flush=True)
  print(f"float32, batch 2 x {args.length} tokens; load average {os.getloadavg()[0]:.1f}; "
        f"{jax.devices()[0].platform}")


if __name__ == "__main__":
  main()
