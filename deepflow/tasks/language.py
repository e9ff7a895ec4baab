"""Language modelling: next-token cross-entropy over int token sequences, exact token-level
perplexity over a split, and sampling text from the trained model (``deepflow sample``)."""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from deepflow.data.packing import POSITIONS, SEGMENTS
from deepflow.data.pipeline import INPUTS, TARGETS
from deepflow.models import decoding, model_options
from deepflow.registry import ConfigError, MODELS, TASKS
from deepflow.tasks.base import Task

SAMPLE_OPTIONS = ("prompt", "num_tokens", "temperature", "top_k")
DEFAULT_NUM_TOKENS = 200
# One compiled program per (model, length, settings): prefill, then a scan over the new tokens.
_SAMPLE = jax.jit(decoding.sample, static_argnums=(0, 3),
                  static_argnames=("temperature", "top_k", "use_cache"))


@TASKS.register("language_model")
class LanguageModel(Task):
  """Next-token prediction. Batches hold int tokens ``inputs`` and ``targets`` (B, T), the
  targets being the inputs shifted by one (as ``bundled:text`` gives them); the model gives
  logits (B, T, vocab): ``transformer_lm``, or ``rnn`` with ``per_step=True``.

  The vocabulary size comes from the dataset's metadata (``vocab_size``, else ``len(vocab)``)
  and fills the model's ``vocab_size`` when the config leaves it 0. Training minimizes the mean
  token cross-entropy. Eval keeps each example's summed negative log-likelihood and token count,
  so the split's ``loss`` (nats per token), ``perplexity`` (its exp), ``bits_per_token`` and
  next-token ``accuracy`` are exact averages over its tokens, whatever the batching.
  ``ignore_id``: a target id (padding) neither scored nor counted; None scores every position.

  Packed text (``data.tokenizer``, ``deepflow.data.text``) adds ``segments`` and ``positions``
  to each batch: the model attends within documents only, and only positions of a document
  (segment > 0, not padding) are scored and counted.

  ``sample`` continues a prompt (text over ``metadata['vocab']``: a string of characters, or a
  list of tokens joined by spaces; with a tokenizer, any text, after BOS) with the model's
  sampler and its key/value cache.

  Not supported: ``tfds:tiny_shakespeare``, whose splits are one string each (one example, no
  supervised keys), which per-example transforms cannot cut into training chunks; the
  character corpus for language modelling is ``bundled:text``."""

  OPTIONS = {"ignore_id": None}

  def __init__(self, config, spec):
    if not np.issubdtype(np.dtype(spec.input_dtype), np.integer):
      raise ConfigError(f"task 'language_model' needs int token inputs, got {spec.input_dtype} "
                        f"from {config.data.source}; a float transform (e.g. the default "
                        f"standardize) must not touch tokens: set data.transforms=[]")
    super().__init__(config, spec)
    ignore = self.options["ignore_id"]
    if ignore is not None and (not isinstance(ignore, int) or isinstance(ignore, bool)):
      raise ConfigError(f"task.ignore_id must be None or a token id, got {ignore!r}")

  # -- building ----------------------------------------------------------------------------------

  def num_outputs(self) -> int:
    meta = self.spec.metadata
    size = meta.get("vocab_size") or len(meta.get("vocab") or ()) or self.config.model.get(
        "vocab_size", 0)
    if not size:
      raise ConfigError(f"task 'language_model' needs the vocabulary size: a dataset whose "
                        f"metadata gives vocab_size or vocab (e.g. bundled:text), or "
                        f"model.vocab_size; {self.config.data.source} gives neither")
    return int(size)

  @staticmethod
  def build_model(model_config, num_outputs: int):
    """The model with its token embedding sized to the data's vocabulary (``vocab_size`` 0)."""
    if "vocab_size" not in model_options(MODELS.get(model_config.name)):
      raise ConfigError(f"task 'language_model' needs a token model (transformer_lm, or rnn "
                        f"with per_step=True); model {model_config.name!r} takes no tokens")
    vocab_size = model_config.vocab_size
    if 0 < vocab_size < num_outputs:
      raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the data's vocabulary "
                        f"of {num_outputs} tokens; leave it 0 to take the data's")
    fields = model_config.to_dict()
    fields["vocab_size"] = vocab_size or num_outputs
    return Task.build_model(ml_collections.ConfigDict(fields), num_outputs)

  # -- training and evaluation -------------------------------------------------------------------

  def logits(self, params, model_state, batch, rng, *, train: bool):
    """(logits (B, T, vocab), model state); a sequence-to-one model is refused at trace time."""
    packed = (batch[SEGMENTS], batch[POSITIONS]) if SEGMENTS in batch else ()
    logits, model_state = self.apply(params, model_state, batch[INPUTS], rng, train=train,
                                     extra=packed)
    if logits.ndim != 3:
      raise ConfigError(f"task 'language_model' needs one prediction per position (batch, time, "
                        f"vocab), but model {self.config.model.name!r} gives shape "
                        f"{logits.shape}; use transformer_lm, or rnn with per_step=True")
    return logits, model_state

  def token_terms(self, logits: jax.Array, batch):
    """Per token: negative log-likelihood, weight (0 at ``ignore_id`` and at packed rows'
    padding), argmax correct."""
    targets = batch[TARGETS].astype(jnp.int32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    ignore = self.options["ignore_id"]
    weights = (jnp.ones_like(nll) if ignore is None
               else (targets != ignore).astype(jnp.float32))
    if SEGMENTS in batch:
      weights = weights * (batch[SEGMENTS] > 0)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return nll * weights, weights, correct * weights

  def loss(self, params, model_state, batch, rng):
    logits, model_state = self.logits(params, model_state, batch, rng, train=True)
    nll, weights, correct = self.token_terms(logits, batch)
    count = jnp.maximum(weights.sum(), 1.0)
    return nll.sum() / count, ({"accuracy": correct.sum() / count}, model_state)

  def eval_outputs(self, params, model_state, batch):
    logits, _ = self.logits(params, model_state, batch, None, train=False)
    nll, weights, correct = self.token_terms(logits, batch)
    return {"nll": nll.sum(-1), "tokens": weights.sum(-1), "correct": correct.sum(-1)}

  def summarize(self, outputs):
    tokens = float(np.sum(outputs["tokens"], dtype=np.float64))
    loss = float(np.sum(outputs["nll"], dtype=np.float64)) / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_token": loss / math.log(2),
            "accuracy": float(np.sum(outputs["correct"], dtype=np.float64)) / max(tokens, 1.0),
            "tokens": tokens}

  # -- sampling ----------------------------------------------------------------------------------

  @property
  def vocab(self) -> str | Sequence[str] | None:
    """The id -> token table from the dataset's metadata (None when it has none)."""
    vocab = self.spec.metadata.get("vocab")
    return vocab if vocab else None

  @property
  def tokenizer(self):
    """The run's tokenizer (``data.tokenizer``), or None for a dataset stored as ids."""
    load = self.spec.metadata.get("load_tokenizer")
    return load() if load else None

  def encode(self, text: str) -> np.ndarray:
    """Prompt text -> ids: BOS and the tokenizer's ids; else characters of a string vocabulary,
    or whitespace-separated tokens (ids themselves when the dataset has no vocabulary)."""
    if self.tokenizer is not None:
      return np.asarray([self.tokenizer.bos, *self.tokenizer.encode([text])[0]], np.int32)
    vocab = self.vocab
    pieces = list(text) if isinstance(vocab, str) else text.split()
    if vocab is None:
      bad = [p for p in pieces if not p.isdigit() or int(p) >= self.num_outputs()]
      table = {p: int(p) for p in pieces if p not in bad}
    else:
      table = {token: i for i, token in enumerate(vocab)}
      bad = [p for p in pieces if p not in table]
    if bad:
      shown = ", ".join(repr(p) for p in dict.fromkeys(bad))
      raise ConfigError(f"the prompt has tokens outside the model's vocabulary of "
                        f"{self.num_outputs()}: {shown}")
    if not pieces:
      raise ConfigError("the prompt must hold at least one token")
    return np.asarray([table[p] for p in pieces], np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    if self.tokenizer is not None:
      return self.tokenizer.decode(ids)
    vocab = self.vocab
    if vocab is None:
      return " ".join(str(int(i)) for i in ids)
    tokens = [vocab[int(i)] for i in ids]
    return "".join(tokens) if isinstance(vocab, str) else " ".join(tokens)

  def sample(self, params, model_state, rng, num: int, **options: Any) -> dict[str, np.ndarray]:
    """``num`` continuations of ``prompt`` (default: BOS with a tokenizer, else the vocabulary's
    first token, a newline for bundled:text) by ``num_tokens`` tokens (default 200, or what
    the model's ``max_len`` leaves), at ``temperature`` (0 = greedy; default 1) among the ``top_k`` most likely (0 =
    all). Returns ``tokens`` (num, T) and their ``text`` (num,)."""
    unknown = sorted(set(options) - set(SAMPLE_OPTIONS))
    if unknown:
      raise ConfigError(f"task 'language_model' has no sample option {', '.join(unknown)}; "
                        f"options: {', '.join(SAMPLE_OPTIONS)}")
    if not isinstance(num, int) or num < 1:
      raise ConfigError(f"the number of samples must be a positive integer, got {num!r}")
    prompt = options.get("prompt")
    if prompt is not None or self.tokenizer is not None:  # a tokenizer's default: BOS alone
      prompt = self.encode(prompt or "")
    else:
      prompt = np.zeros((1,), np.int32)
    num_tokens = options.get("num_tokens")
    if num_tokens is None:
      room = getattr(self.model, "max_len", None)
      num_tokens = DEFAULT_NUM_TOKENS if room is None else max(
          0, min(DEFAULT_NUM_TOKENS, room - len(prompt)))
    prompts = np.tile(prompt, (num, 1))
    decoding.check_lm(self.model, jnp.asarray(prompts), num_tokens)  # one-line errors first
    variables = {"params": params, **model_state}
    tokens = _SAMPLE(self.model, variables, prompts, num_tokens, rng,
                     temperature=float(options.get("temperature", 1.0)),
                     top_k=int(options.get("top_k", 0)))
    tokens = np.asarray(tokens)
    return {"tokens": tokens, "text": np.array([self.decode(row) for row in tokens])}
