"""A character-level LSTM language model on Python's help topics (``bundled:text``: pydoc
prose and grammar, 103 symbols, 128-character chunks; offline).

Run:     deepflow train --config experiments/text_lstm.py --workdir runs/text_lstm
Sample:  deepflow sample --workdir runs/text_lstm --num 1 --prompt "The " \\
             --num_tokens 120 --temperature 0.8
Measured (2-core x86_64 CPU; 600 steps of 32 chunks, 72 s including compilation): test perplexity
4.57 (1.519 nats = 2.19 bits per character, next-character accuracy 60.0%, over all 46,464 test
characters). A sample (prompt "The ", temperature 0.8, 120 characters):

    The defined the decontand’s
       values in a tore if a "__sent__()" andor
    interent must in the rename references in the forman
"""
from deepflow.config import base_config


def get_config():
  config = base_config()
  config.task.name = "language_model"
  # vocab_size stays 0: the task sets it (and the head) from the dataset's vocabulary
  config.model = dict(name="rnn", cell="lstm", hidden_size=256, num_layers=1, embed_dim=64,
                      per_step=True)
  config.data.source = "bundled:text"
  config.data.transforms = []           # tokens, not features: nothing to standardize
  config.data.batch_size = 32
  config.data.eval_batch_size = 128
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 100
  config.optimizer.clip_norm = 1.0
  config.train.steps = 600
  config.train.eval_every = 300
  config.train.checkpoint_every = 300
  return config
