"""A run's first variables from a Hugging Face checkpoint (``model.init_from='hf:DIR'``; the
model section came from it at config time: ``deepflow.hf.section``).

Every variable is read into the run's float32 state one tensor at a time and placed with the
run's shardings; LoRA adapters and ``model.init_skip``'s variables start as in a fresh run.
A language model keeps the checkpoint's vocabulary: its logits cover ``vocab_size`` tokens, and
the language-model task refuses data whose vocabulary does not fit inside (tokenize with the
checkpoint's tokenizer).
"""
from __future__ import annotations

import logging
import re
from typing import Any

import jax
from jax.sharding import Sharding

from deepflow import hf
from deepflow.hf import files, load, section
from deepflow.models import lora as lora_lib

log = logging.getLogger("deepflow")


def initial_variables(model: Any, target: dict[str, Any], shardings: dict[str, Sharding], *,
                      scanned: bool, lora: bool) -> dict[str, jax.Array]:
  """The checkpoint's variables for a run whose model section is ``model``, fitted to
  ``target`` (flat names -> the state's shapes and dtypes) and placed with ``shardings``."""
  directory = section.directory_of(model.init_from)
  config = files.read_config(directory)
  family = hf.family(config["model_type"], f"{directory}/{files.CONFIG}")
  skip = re.compile(model.init_skip) if model.init_skip else None
  head = new_head(family, config, target)
  fresh = lambda path: bool((skip and skip.search(path))  # noqa: E731
                            or (head and head.search(path))
                            or (lora and lora_lib.is_adapter(path)))
  return load.read_into(directory, config, family, target, shardings, scanned=scanned,
                        dtype="model", fresh=fresh)


def new_head(family: Any, config: dict, target: dict[str, Any]) -> re.Pattern | None:
  """The classifier's variables (the family's ``HEAD``) when the run's number of outputs (its
  dataset's classes) differs from the checkpoint's: they start fresh, and the log says so."""
  pattern = getattr(family, "HEAD", None)
  if pattern is None:
    return None
  head = re.compile(pattern)
  ours = {v.shape[-1] for k, v in target.items() if head.search(k)}
  theirs = family.model_section(config)["num_outputs"]
  if ours == {theirs}:
    return None
  log.warning("model.init_from: a new classifier head of %s outputs, initialised fresh (the "
              "checkpoint's has %d)", ", ".join(map(str, sorted(ours))), theirs)
  return head
