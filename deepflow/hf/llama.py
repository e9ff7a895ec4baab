"""Llama, Mistral, Qwen2 and Qwen3 (``*ForCausalLM``) as deepflow's ``llama`` model
(``deepflow.models.llama``).

Each checkpoint's config.json gives the sizes, ``num_key_value_heads``, ``head_dim``, the RoPE
settings (``rope_parameters``, or the older ``rope_theta`` + ``rope_scaling``), RMSNorm epsilon,
biases, tied embeddings; the family decides what the config leaves implicit: Qwen2 has q/k/v
biases and no output bias, Qwen3 normalizes q and k per head, Mistral slides its window over
every layer. Linear weights are PyTorch's (out, in), transposed to Flax's (in, out).
"""
from __future__ import annotations

from typing import Mapping

from deepflow.hf.rules import WeightRule, transpose
from deepflow.models.llama import ROPE_TYPES
from deepflow.registry import ConfigError

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
UNUSED = (r"rotary_emb\.inv_freq$",)
DEFAULT_THETA = 10000.0


def _rope(c: dict) -> dict:
  """The rope fields from ``rope_parameters`` (transformers 5) or ``rope_theta`` and
  ``rope_scaling`` (earlier)."""
  params = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
  kind = params.get("rope_type", params.get("type", "default"))
  theta = params.get("rope_theta", c.get("rope_theta", DEFAULT_THETA))
  if kind not in ROPE_TYPES:
    raise ConfigError(f"config.json: rope type {kind!r} is not supported (supported: "
                      f"{', '.join(ROPE_TYPES)})")
  if params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ConfigError("config.json: partial_rotary_factor != 1 is not supported")
  fields = {"rope_theta": float(theta), "rope_type": kind}
  if kind != "default":
    fields["rope_factor"] = float(params["factor"])
  if kind == "llama3":
    fields.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                  rope_high_freq_factor=float(params["high_freq_factor"]),
                  rope_original_max_len=int(params.get("original_max_position_embeddings",
                                                       c["max_position_embeddings"])))
  return fields


def _window(c: dict) -> int:
  """Mistral's window (every layer); Qwen's when ``use_sliding_window`` and every layer slides
  (``layer_types``, or the layers from ``max_window_layers`` on), else one line."""
  window = int(c.get("sliding_window") or 0)
  if c["model_type"] == "mistral" or not window:
    return window
  if not c.get("use_sliding_window"):
    return 0
  n = c["num_hidden_layers"]
  kinds = set(c.get("layer_types") or ("sliding_attention" if i >= c.get("max_window_layers", n)
                                       else "full_attention" for i in range(n)))
  if kinds == {"full_attention"}:
    return 0
  if kinds == {"sliding_attention"}:
    return window
  raise ConfigError("config.json: sliding windows on some layers only (layer_types / "
                    "max_window_layers) are not supported; deepflow slides all layers or none")


def model_section(c: dict) -> dict:
  """``llama`` fields from a Llama/Mistral/Qwen2/Qwen3 config.json."""
  kind = c["model_type"]
  if c.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"config.json: hidden_act {c['hidden_act']!r} is not supported (silu)")
  heads = c["num_attention_heads"]
  bias = bool(c.get("attention_bias", False))
  return {"name": "llama", "vocab_size": c["vocab_size"], "d_model": c["hidden_size"],
          "num_heads": heads, "num_kv_heads": c.get("num_key_value_heads") or heads,
          "head_dim": c.get("head_dim") or c["hidden_size"] // heads,
          "num_layers": c["num_hidden_layers"], "mlp_dim": c["intermediate_size"],
          "max_len": c["max_position_embeddings"], **_rope(c),
          "norm_eps": c.get("rms_norm_eps", 1e-6),
          "qkv_bias": True if kind == "qwen2" else bias and kind != "mistral",
          "out_bias": bias and kind in ("llama", "qwen3"),
          "mlp_bias": bool(c.get("mlp_bias", False)) and kind == "llama",
          "qk_norm": kind == "qwen3", "sliding_window": _window(c),
          "tie_embeddings": bool(c.get("tie_word_embeddings", False))}


def _model_type(m: Mapping) -> str:
  """The transformers family that computes what this ``llama`` model does."""
  if m["qk_norm"]:
    kind = "qwen3"
  elif m["qkv_bias"] and not m["out_bias"]:
    kind = "qwen2"
  elif m["sliding_window"]:
    kind = "mistral"
  else:
    kind = "llama"
  fits = {"qwen3": m["qkv_bias"] == m["out_bias"] and not m["mlp_bias"],
          "qwen2": not m["mlp_bias"],
          "mistral": not (m["qkv_bias"] or m["out_bias"] or m["mlp_bias"]),
          "llama": m["qkv_bias"] == m["out_bias"] and not m["sliding_window"]}[kind]
  if not fits:
    raise ConfigError(f"this llama model (qkv_bias={m['qkv_bias']}, out_bias={m['out_bias']}, "
                      f"mlp_bias={m['mlp_bias']}, qk_norm={m['qk_norm']}, sliding_window="
                      f"{m['sliding_window']}) matches no transformers family")
  return kind


def hf_config(model: Mapping) -> dict:
  """config.json for a ``llama`` model, as the family that computes the same."""
  if model["name"] != "llama":
    raise ConfigError(f"model {model['name']!r} is not a llama model")
  kind = _model_type(model)
  heads, head_dim = model["num_heads"], model["head_dim"] or model["d_model"] // model["num_heads"]
  rope = {"rope_type": model["rope_type"], "rope_theta": model["rope_theta"]}
  if model["rope_type"] != "default":
    rope["factor"] = model["rope_factor"]
  if model["rope_type"] == "llama3":
    rope.update(low_freq_factor=model["rope_low_freq_factor"],
                high_freq_factor=model["rope_high_freq_factor"],
                original_max_position_embeddings=model["rope_original_max_len"])
  config = {"model_type": kind, "architectures": [f"{ARCHITECTURES[kind]}ForCausalLM"],
            "vocab_size": model["vocab_size"], "hidden_size": model["d_model"],
            "num_attention_heads": heads, "num_key_value_heads": model["num_kv_heads"] or heads,
            "head_dim": head_dim, "num_hidden_layers": model["num_layers"],
            "intermediate_size": model["mlp_dim"], "max_position_embeddings": model["max_len"],
            "rms_norm_eps": model["norm_eps"], "hidden_act": "silu",
            "rope_parameters": rope, "rope_theta": model["rope_theta"],
            "tie_word_embeddings": model["tie_embeddings"], "attention_dropout": 0.0,
            "bos_token_id": None, "eos_token_id": None}
  if kind in ("llama", "qwen3"):
    config["attention_bias"] = model["out_bias"]
  if kind == "llama":
    config["mlp_bias"] = model["mlp_bias"]
  if kind == "mistral":
    config["sliding_window"] = model["sliding_window"]
  elif kind in ("qwen2", "qwen3"):
    window = model["sliding_window"]
    config.update(use_sliding_window=bool(window), sliding_window=window or None,
                  max_window_layers=0 if window else model["num_layers"],
                  layer_types=[("sliding" if window else "full") + "_attention"]
                  * model["num_layers"])
  return config


ARCHITECTURES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def weight_rules(c: dict) -> list[WeightRule]:
  section = model_section(c)
  rules = [WeightRule("model.embed_tokens.weight", "params/embed/embedding"),
           WeightRule("model.norm.weight", "params/final_norm/scale")]
  if not section["tie_embeddings"]:
    rules.append(WeightRule("lm_head.weight", "params/head/kernel", transpose, transpose))
  for i in range(section["num_layers"]):
    hf, df = f"model.layers.{i}.", f"params/block{i}/"
    rules += [WeightRule(hf + "input_layernorm.weight", df + "input_norm/scale"),
              WeightRule(hf + "post_attention_layernorm.weight",
                         df + "post_attention_norm/scale")]
    for name, biased in (("q", "qkv_bias"), ("k", "qkv_bias"), ("v", "qkv_bias"),
                         ("o", "out_bias")):
      rules.append(WeightRule(f"{hf}self_attn.{name}_proj.weight", f"{df}attn/{name}/kernel",
                              transpose, transpose))
      if section[biased]:
        rules.append(WeightRule(f"{hf}self_attn.{name}_proj.bias", f"{df}attn/{name}/bias"))
    if section["qk_norm"]:
      rules += [WeightRule(f"{hf}self_attn.{n}_norm.weight", f"{df}attn/{n}_norm/scale")
                for n in ("q", "k")]
    for name in ("gate", "up", "down"):
      rules.append(WeightRule(f"{hf}mlp.{name}_proj.weight", f"{df}mlp/{name}/kernel",
                              transpose, transpose))
      if section["mlp_bias"]:
        rules.append(WeightRule(f"{hf}mlp.{name}_proj.bias", f"{df}mlp/{name}/bias"))
  return rules
