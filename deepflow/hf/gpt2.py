"""GPT-2 (``GPT2LMHeadModel``) as deepflow's ``transformer_lm``: learned positions, pre-LN
blocks, tanh-approximated GELU (``gelu_new``, deepflow's ``gelu``), the head tied to the token
embedding, LayerNorm epsilon from the config.

GPT-2 stores its projections as ``Conv1D``: (in, out), Flax's own layout, so no kernel is
transposed; the fused ``c_attn`` (d, 3d) holds q, k, v one after the other, each head after
head, which is exactly ``SelfAttention``'s ``qkv`` kernel (d, 3, heads, head_dim) reshaped.
"""
from __future__ import annotations

from typing import Mapping

from deepflow.hf.rules import WeightRule
from deepflow.registry import ConfigError

MODEL_TYPES = ("gpt2",)
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # tanh-approximated GELU
UNUSED = (r"(^|\.)attn\.(masked_)?bias$", r"^lm_head\.weight$")  # causal-mask buffers; tied head


def model_section(c: dict) -> dict:
  """``transformer_lm`` fields from a GPT-2 config.json; what it cannot express is one line."""
  refuse = {"activation_function": c.get("activation_function", "gelu_new") not in ACTIVATIONS,
            "tie_word_embeddings": not c.get("tie_word_embeddings", True),
            "scale_attn_by_inverse_layer_idx": c.get("scale_attn_by_inverse_layer_idx", False),
            "scale_attn_weights": not c.get("scale_attn_weights", True),
            "add_cross_attention": c.get("add_cross_attention", False)}
  bad = [f"{k}={c.get(k)!r}" for k, v in refuse.items() if v]
  if bad:
    raise ConfigError(f"config.json: a GPT-2 with {', '.join(bad)} is not supported (deepflow "
                      f"reads tied-head, tanh-GELU, 1/sqrt(head_dim)-scaled GPT-2 models)")
  return {"name": "transformer_lm", "vocab_size": c["vocab_size"], "d_model": c["n_embd"],
          "num_heads": c["n_head"], "num_layers": c["n_layer"],
          "mlp_dim": c.get("n_inner") or 4 * c["n_embd"], "max_len": c["n_positions"],
          "positions": "learned", "activation": "gelu",
          "norm_eps": c.get("layer_norm_epsilon", 1e-5), "tie_embeddings": True}


def hf_config(model: Mapping) -> dict:
  """config.json for a ``transformer_lm`` that is a GPT-2: tied head, learned positions, GELU."""
  if model["name"] != "transformer_lm":
    raise ConfigError(f"model {model['name']!r} is not a GPT-2 (transformer_lm)")
  wrong = {k: model[k] for k, v in (("tie_embeddings", True), ("positions", "learned"),
                                     ("activation", "gelu")) if model[k] != v}
  if wrong:
    raise ConfigError(f"transformer_lm is written as GPT-2 only with tie_embeddings=True, "
                      f"positions='learned', activation='gelu'; this one has "
                      f"{', '.join(f'{k}={v!r}' for k, v in wrong.items())}")
  dropout = model.get("dropout", 0.0)
  return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
          "vocab_size": model["vocab_size"], "n_embd": model["d_model"],
          "n_head": model["num_heads"], "n_layer": model["num_layers"],
          "n_inner": model["mlp_dim"], "n_positions": model["max_len"],
          "layer_norm_epsilon": model["norm_eps"], "activation_function": "gelu_new",
          "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": 0.0,
          "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": None}


def _reshape(deepflow_shape: tuple, hf_shape: tuple) -> dict:
  return {"to_deepflow": lambda x: x.reshape(deepflow_shape),
          "to_hf": lambda x: x.reshape(hf_shape)}


def weight_rules(c: dict) -> list[WeightRule]:
  d, heads, layers = c["n_embd"], c["n_head"], c["n_layer"]
  head_dim = d // heads
  rules = [WeightRule("transformer.wte.weight", "params/embed/embedding"),
           WeightRule("transformer.wpe.weight", "params/positions/embedding"),
           WeightRule("transformer.ln_f.weight", "params/final_norm/scale"),
           WeightRule("transformer.ln_f.bias", "params/final_norm/bias")]
  for i in range(layers):
    hf, df = f"transformer.h.{i}.", f"params/block{i}/"
    attn = df + "SelfAttention_0/"
    rules += [
        WeightRule(hf + "ln_1.weight", df + "LayerNorm_0/scale"),
        WeightRule(hf + "ln_1.bias", df + "LayerNorm_0/bias"),
        WeightRule(hf + "attn.c_attn.weight", attn + "qkv/kernel",
                   **_reshape((d, 3, heads, head_dim), (d, 3 * d))),
        WeightRule(hf + "attn.c_attn.bias", attn + "qkv/bias",
                   **_reshape((3, heads, head_dim), (3 * d,))),
        WeightRule(hf + "attn.c_proj.weight", attn + "out/kernel",
                   **_reshape((heads, head_dim, d), (d, d))),
        WeightRule(hf + "attn.c_proj.bias", attn + "out/bias"),
        WeightRule(hf + "ln_2.weight", df + "LayerNorm_1/scale"),
        WeightRule(hf + "ln_2.bias", df + "LayerNorm_1/bias"),
        WeightRule(hf + "mlp.c_fc.weight", df + "MlpBlock_0/Dense_0/kernel"),
        WeightRule(hf + "mlp.c_fc.bias", df + "MlpBlock_0/Dense_0/bias"),
        WeightRule(hf + "mlp.c_proj.weight", df + "MlpBlock_0/Dense_1/kernel"),
        WeightRule(hf + "mlp.c_proj.bias", df + "MlpBlock_0/Dense_1/bias")]
  return rules
