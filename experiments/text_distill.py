"""A 4x smaller character-level Transformer distilled from the bundled text Transformer: the
language-model student of ``task.name='distillation'`` (per character, the teacher's
next-character distribution at temperature T beside the text's own next character).

Train the teacher once, then the student (``task.teacher`` is the teacher's run directory; a
Hugging Face checkpoint is ``hf:DIR``, with the data tokenized by its tokenizer:
``experiments/hf_distill.py``):

  deepflow train --config experiments/text_transformer.py --workdir runs/text_transformer
  deepflow train --config experiments/text_distill.py --workdir runs/text_distill

``benchmarks/distill_vs_labels.py --experiment text_distill`` trains this student (27,943
parameters; the teacher 121,575) distilled and from the text alone (``task.name=
'language_model'``, all else equal) over three seeds. Measured (2-core x86_64 CPU, 800 steps of
32 chunks, seeds 0-2): test perplexity distilled 7.09 mean (6.80..7.33), text alone 8.14
(7.99..8.36), next-character accuracy 47.4% vs 43.5%; the teacher 4.69 (58.6%).
"""
import os

import deepflow

TEACHER = "runs/text_transformer"
TEXT_TRANSFORMER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "text_transformer.py")


def get_config():
  """The teacher's experiment (data, optimizer, 800 steps) with a quarter of its width and
  the distillation task."""
  config = deepflow.load_config(TEXT_TRANSFORMER)
  config.model.update(d_model=32, mlp_dim=64)
  with config.unlocked():
    config.task = dict(name="distillation", teacher=TEACHER, temperature=2.0, hard_weight=0.5)
  return config
