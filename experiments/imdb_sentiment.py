"""Sentiment classification of IMDB movie reviews (``tfds:imdb_reviews``: 25,000 train and
25,000 test reviews, positive or negative) with a Transformer encoder over word tokens.

The reviews are raw text; the ``tokenize`` transform fits a 20,000-word vocabulary on the train
split and maps each review to its first 256 word ids (0-padded). The dataset needs a download,
so prepare it once where there is network (deepflow never downloads at run time):

  tfds build imdb_reviews --data_dir ~/tensorflow_datasets --file_format=array_record

Run:  deepflow train --config experiments/imdb_sentiment.py --workdir runs/imdb_sentiment
Measured: not run here: this offline machine has no prepared imdb_reviews; the test suite runs
the config on ``tfds.testing.mock_data`` (random text) to check that it builds and trains.
"""
from deepflow.config import base_config

VOCAB_SIZE = 20000  # the tokenizer's vocabulary, which the model's embedding must match
LENGTH = 256


def get_config():
  config = base_config()
  config.model = dict(name="transformer_encoder", vocab_size=VOCAB_SIZE, d_model=64, num_heads=4,
                      num_layers=2, mlp_dim=128, max_len=LENGTH, pooling="mean", dropout=0.1)
  config.data.source = "tfds:imdb_reviews"
  config.data.transforms = [dict(name="tokenize", level="word", length=LENGTH,
                                 vocab_size=VOCAB_SIZE)]
  config.data.batch_size = 64
  config.data.eval_batch_size = 256
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 200
  config.optimizer.weight_decay = 0.01
  config.train.steps = 3000
  config.train.eval_every = 1000
  config.train.checkpoint_every = 1000
  return config
