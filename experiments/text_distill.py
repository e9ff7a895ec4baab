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
from deepflow.config import base_config

TEACHER = "runs/text_transformer"


def get_config():
  config = base_config()
  config.task = dict(name="distillation", teacher=TEACHER, temperature=2.0, hard_weight=0.5)
  config.model = dict(name="transformer_lm", d_model=32, num_heads=4, num_layers=2, mlp_dim=64,
                      max_len=128)
  config.data.source = "bundled:text"
  config.data.transforms = []           # tokens, not features
  config.data.batch_size = 32
  config.data.eval_batch_size = 128
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 100
  config.optimizer.weight_decay = 0.01
  config.optimizer.clip_norm = 1.0
  config.train.steps = 800
  config.train.eval_every = 400
  config.train.checkpoint_every = 400
  return config
