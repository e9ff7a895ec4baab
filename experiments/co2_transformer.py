"""Forecasting Mauna Loa CO2 one month ahead with a Transformer encoder (``bundled:co2``:
monthly means 1958-2001 from statsmodels, 24 months in, the next month out; the last 20% of
the series, from 1993-04, is the test period). Like ``co2_lstm.py`` the model sees the window
relative to its last value (``task.residual``), since the test period's levels exceed the
train period's.

Run:  deepflow train --config experiments/co2_transformer.py --workdir runs/co2_transformer
Measured (2-core x86_64 CPU; 2000 steps of 32, 15 s including compilation), over the 105 test
months: RMSE 0.463 ppm against 1.269 ppm for persistence (this month = last month), ratio 0.365;
MAE 0.365 ppm against 1.129 ppm.
"""
from deepflow.config import base_config


def get_config():
  config = base_config()
  config.task = dict(name="forecasting", residual=True)
  config.model = dict(name="transformer_encoder", d_model=32, num_heads=4, num_layers=2,
                      mlp_dim=64, max_len=24, pooling="mean")
  config.data.source = "bundled:co2"
  config.data.transforms = [dict(name="standardize", keys=("input", "target"))]
  config.data.batch_size = 32
  config.data.eval_batch_size = 128
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup_steps = 100
  config.optimizer.weight_decay = 1e-4
  config.train.steps = 2000
  config.train.eval_every = 1000
  config.train.checkpoint_every = 1000
  return config
