"""Writes tests/fixtures/hf/<name>/, once: tiny random-initialised ``transformers`` language
models saved with ``save_pretrained`` (config.json, model.safetensors, or shards and
model.safetensors.index.json) and ``reference.npz``: the reference's f32 logits on fixed tokens
and 32 greedy tokens from ``generate``. ``tests/hf/`` loads them with
``deepflow.load_pretrained`` and checks deepflow's logits and generations against these, with
no torch.

    python tools/make_hf_fixtures.py

Each model is 2 layers, hidden 32, vocabulary 64. Weights are rounded to bfloat16 and most are
saved so (half the bytes; loading with ``dtype='float32'`` gives the same values exactly), and
the references are computed in float32 from those rounded weights. Initialised with a wide
``initializer_range`` so that greedy generation has clear argmaxes (the printed margin is the
smallest gap between the top two logits over every generated step).
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "hf")
VOCAB, LENGTH, PROMPT, NEW = 64, 16, 8, 32

LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             initializer_range=0.3, rms_norm_eps=1e-5)

# name -> (config class, fields, dtype saved, max shard size or None)
CONFIGS = {
    "gpt2": (transformers.GPT2Config,
             dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64,
                  initializer_range=0.3, layer_norm_epsilon=1e-5), torch.float32, None),
    "gpt2_eps": (transformers.GPT2Config,
                 dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_inner=48,
                      n_positions=64, initializer_range=0.3, layer_norm_epsilon=1e-3,
                      activation_function="gelu_pytorch_tanh"), torch.bfloat16, None),
    "llama_gqa": (transformers.LlamaConfig, dict(LLAMA, tie_word_embeddings=False),
                  torch.bfloat16, None),
    "llama3_rope_mqa_tied": (transformers.LlamaConfig,
                             dict(LLAMA, num_key_value_heads=1, tie_word_embeddings=True,
                                  rope_parameters=dict(rope_type="llama3", rope_theta=500000.0,
                                                       factor=8.0, low_freq_factor=1.0,
                                                       high_freq_factor=4.0,
                                                       original_max_position_embeddings=16)),
                             torch.bfloat16, None),
    "llama_linear_bias_headdim": (transformers.LlamaConfig,
                                  dict(LLAMA, num_key_value_heads=4, head_dim=16,
                                       attention_bias=True, mlp_bias=True,
                                       rope_parameters=dict(rope_type="linear", rope_theta=100.0,
                                                            factor=2.0)),
                                  torch.bfloat16, None),
    "mistral_window": (transformers.MistralConfig, dict(LLAMA, sliding_window=6, head_dim=8),
                       torch.bfloat16, None),
    "qwen2_bias_tied": (transformers.Qwen2Config,
                        dict(LLAMA, num_key_value_heads=1, tie_word_embeddings=True),
                        torch.bfloat16, None),
    "qwen3_qknorm_sharded": (transformers.Qwen3Config,
                             dict(LLAMA, head_dim=16, tie_word_embeddings=False),
                             torch.bfloat16, "16KB"),
}


def model_for(config_cls, fields: dict, seed: int) -> torch.nn.Module:
  """The random-initialised causal LM, its 1-D parameters perturbed, every weight rounded to a
  bfloat16 value, in float32."""
  torch.manual_seed(seed)
  config = config_cls(**fields)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:  # norms' scales (ones) and biases (zeros) made non-trivial
        p.add_(torch.randn_like(p).mul_(0.25))
      p.copy_(p.to(torch.bfloat16).to(torch.float32))
  model.generation_config.eos_token_id = None  # always NEW tokens, never an early stop
  model.generation_config.pad_token_id = 0  # (an explicit attention mask: no token is padding)
  return model.eval()


def references(model: torch.nn.Module, seed: int) -> tuple[dict[str, np.ndarray], float]:
  """Tokens, logits, prompt and greedy generation; and the smallest top-2 logit gap seen."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, size=(2, LENGTH)).astype(np.int64)
  prompt = tokens[:, :PROMPT]
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens)).logits.numpy()
    out = model.generate(torch.from_numpy(prompt), attention_mask=torch.ones(prompt.shape),
                         max_new_tokens=NEW, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
  steps = torch.stack(out.logits, 1).numpy()  # (B, NEW, V)
  top2 = np.sort(steps, axis=-1)[..., -2:]
  return ({"tokens": tokens.astype(np.int32), "logits": logits.astype(np.float32),
           "prompt": prompt.astype(np.int32),
           "generated": out.sequences.numpy().astype(np.int32)},
          float((top2[..., 1] - top2[..., 0]).min()))


def main():
  shutil.rmtree(OUT, ignore_errors=True)
  for seed, (name, (config_cls, fields, dtype, shard)) in enumerate(CONFIGS.items()):
    model = model_for(config_cls, fields, seed)
    refs, margin = references(model, seed)
    path = os.path.join(OUT, name)
    model.to(dtype).save_pretrained(path, max_shard_size=shard or "50GB")
    os.remove(os.path.join(path, "generation_config.json"))  # decoding settings: not read
    np.savez(os.path.join(path, "reference.npz"), **refs)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    print(f"{name}: {sorted(os.listdir(path))} {size / 1024:.0f} KiB, "
          f"smallest greedy top-2 gap {margin:.4f}")


if __name__ == "__main__":
  main()
