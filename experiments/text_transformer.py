"""A character-level decoder-only Transformer language model on Python's help topics
(``bundled:text``: pydoc prose and grammar, 103 symbols, 128-character chunks; offline).

Run:     deepflow train --config experiments/text_transformer.py --workdir runs/text_transformer
Sample:  deepflow sample --workdir runs/text_transformer --num 1 --prompt "The " \\
             --num_tokens 120 --temperature 0.8
Measured (2-core x86_64 CPU; 800 steps of 32 chunks, 78 s including compilation): test perplexity
4.69 (1.545 nats = 2.23 bits per character, next-character accuracy 58.6%, over all 46,464 test
characters). A sample (prompt "The ", temperature 0.8, 120 characters):

    The defineration code in of the for sepondition if a "__strtation *__or__()" is deffix* or
    within lit a sequence.

    If the co
"""
from deepflow.config import base_config


def get_config():
  config = base_config()
  config.task.name = "language_model"
  # vocab_size stays 0: the task sets it from the dataset's vocabulary. max_len is the chunk
  # length: learned positions past it would never be trained, so sampling stops there.
  config.model = dict(name="transformer_lm", d_model=64, num_heads=4, num_layers=2,
                      mlp_dim=256, max_len=128)
  config.data.source = "bundled:text"
  config.data.transforms = []           # tokens, not features: nothing to standardize
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
