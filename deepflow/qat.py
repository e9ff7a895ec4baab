"""Quantization-aware training: ``model.quantization='int8'`` (or ``'int4'``) in any experiment
trains, from the first step, the integer model that ``deepflow.quantize`` computes after
training, so the weights learn to sit where the rounding leaves them.

The experiment's task runs every forward pass (train and eval steps alike) through
``quantize.quantized_task(task, scheme, trainable=True)``: each matmul and convolution that reads a
weight is qwix's integer op (activations int8 per row at run time, weights int8 or int4 per output
channel), the same ops on the same integers as ``deepflow eval --quantize`` and the exported
artifact, so every evaluation during training reports the deployed model's metrics. Two caveats on
"the same": a convolution's integer products are summed in float32, exact while partial sums stay
below 2^24 (the digits CNN's train step took 1.3x the float one's that way, 4.8x with XLA:CPU's
integer convolution); and XLA fuses the float ops between layers (a layer norm, a softmax)
differently in different programs, which may move an activation that lies on a rounding boundary by
one step (jitted, the tests' models and a ViT and a Transformer LM gave equal outputs; a one-layer
Llama's logits, up to 3.8, moved by up to 0.05). Its gradient is the straight-through estimator:
the float layer's gradient at the dequantized activations and weights, each rounding passed as the
identity. Only the forward pass changes: the parameters, optimizer state and checkpoints stay
float32 master weights, so resuming, ``init_from`` and early stopping work as in any run, and
``deepflow export`` of the run writes the quantized artifact (``export_scheme``) from them.

Forward passes outside the task's ``apply`` stay float: a language model's ``deepflow sample``
(its decoding calls the model itself) and the contrastive task's probe features.

Which models: those whose weights the rewrite reaches (mlp, cnn, resnet, vit, transformers);
weights read inside a loop (the rnn family, ``scan_layers=True``) are refused in one line naming
the layer, when the experiment is built. ``model.lora`` is refused too: its kernels are merged
inside the exported function, where the rewrite does not see them as weights.
"""
from __future__ import annotations

from typing import Any, Collection

import jax

from deepflow import quantize
from deepflow.registry import ConfigError


def scheme_of(config: Any) -> str | None:
  """The run's ``model.quantization`` ('int8', 'int4'), None when off (''), checked."""
  value = config.model.get("quantization", "")
  if not value:
    return None
  if value not in quantize.SCHEMES:
    raise ConfigError(f"model.quantization must be one of {', '.join(quantize.SCHEMES)} (or '' "
                      f"for float), got {value!r}")
  return value


def quantization_aware(task: Any, config: Any) -> Any:
  """``task`` itself for a float run; with ``model.quantization``, a copy of it whose forward
  pass is the quantized model's, differentiable (see the module docstring), after checking
  that the rewrite reaches the model's weights (a one-line ConfigError otherwise)."""
  scheme = scheme_of(config)
  if scheme is None:
    return task
  if config.model.lora.rank:
    raise ConfigError("model.quantization trains the quantized kernels themselves; it does not "
                      "combine with model.lora (set model.lora.rank=0)")
  params, model_state = jax.eval_shape(task.init, jax.random.PRNGKey(0))
  inputs, *extra = task.example_args()
  forward = lambda p, s, x: task.apply(p, s, x, None, train=False, extra=tuple(extra))  # noqa
  quantize.quantized_axes(forward, scheme, params, model_state, inputs)
  return quantize.quantized_task(task, scheme, trainable=True)


def export_scheme(config: Any, requested: str | None,
                  supported: Collection[str] = tuple(quantize.SCHEMES)) -> str | None:
  """The quantization a command applies to a run (its export, ``eval --quantize``): the one
  asked for (``requested``), else the one the run was trained with; a request that contradicts
  the training, or one the format has not (``supported``), is a one-line ConfigError."""
  trained = scheme_of(config)
  if trained and requested and requested != trained:
    raise ConfigError(f"the run was trained for {trained} (model.quantization); --quantize "
                      f"{requested} contradicts it")
  scheme = requested or trained
  if scheme and scheme not in supported:
    raise ConfigError(f"this format writes {', '.join(supported)} models, not {scheme}"
                      f"{' (the run was trained for it)' if trained else ''}")
  return scheme


def training(config: Any) -> str:
  """How a quantized artifact's weights were trained, for its ``signature.json``."""
  return ("quantization-aware (model.quantization)" if scheme_of(config)
          else "float, quantized after training")
