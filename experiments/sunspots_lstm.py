"""Forecasting yearly sunspot activity one year ahead with an LSTM (``bundled:sunspots``:
1700-2008 from statsmodels, 12 years in, the next year out; the last 20% of the series, from
1947, is the test period).

Run:  deepflow train --config experiments/sunspots_lstm.py --workdir runs/sunspots_lstm
Measured (2-core x86_64 CPU; 1000 steps of 32, 6 s including compilation), over the 62 test years:
RMSE 16.4 against 33.3 for persistence (this year = last year), ratio 0.494; MAE 13.4 against 25.4
(yearly mean sunspot numbers).
"""
from deepflow.config import base_config


def get_config():
  config = base_config()
  config.task = dict(name="forecasting", residual=True)
  config.model = dict(name="rnn", cell="lstm", hidden_size=32)
  config.data.source = "bundled:sunspots"
  config.data.transforms = [dict(name="standardize", keys=("input", "target"))]
  config.data.batch_size = 32
  config.data.eval_batch_size = 64
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.schedule = "cosine"
  config.train.steps = 1000
  config.train.eval_every = 500
  config.train.checkpoint_every = 500
  return config
