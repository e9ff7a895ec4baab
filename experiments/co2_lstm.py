"""Forecasting Mauna Loa CO2 one month ahead with an LSTM (``bundled:co2``: monthly means
1958-2001 from statsmodels, 24 months in, the next month out; the last 20% of the series,
from 1993-04, is the test period, so nothing from it is seen in training).

The model works on the window relative to its last value (``task.residual``): the test period
lies above every CO2 level of the train period, and without this the same model, fed levels
it never saw, does worse than persistence (rmse 6.6 ppm vs 1.27 ppm in a 2000-step trial).

Run:  deepflow train --config experiments/co2_lstm.py --workdir runs/co2_lstm
Measured (2-core x86_64 CPU; 2000 steps of 32, 7 s including compilation), over the 105 test
months: RMSE 0.303 ppm against 1.269 ppm for persistence (this month = last month), ratio 0.239;
MAE 0.237 ppm against 1.129 ppm.
"""
from deepflow.config import base_config


def get_config():
  config = base_config()
  config.task = dict(name="forecasting", residual=True)
  config.model = dict(name="rnn", cell="lstm", hidden_size=32)
  config.data.source = "bundled:co2"
  # one scaling for the past values and the targets (train statistics), inverted for metrics
  config.data.transforms = [dict(name="standardize", keys=("input", "target"))]
  config.data.batch_size = 32
  config.data.eval_batch_size = 128
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.schedule = "cosine"
  config.train.steps = 2000
  config.train.eval_every = 1000
  config.train.checkpoint_every = 1000
  return config
