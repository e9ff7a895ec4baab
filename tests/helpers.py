"""Small shared builders for tests: tiny configs that train in a second."""
from deepflow import config as config_lib


def tiny_config(*overrides: str, model: dict | None = None):
  """A digits-shaped synthetic classification config, validated like a real one."""
  c = config_lib.base_config()
  c.model = model or dict(name="mlp", hidden=(32,))
  c.data.source = "synthetic:digits_like"
  c.data.batch_size = 32
  c.data.eval_batch_size = 64
  c.train.steps = 8
  c.train.log_every = 4
  c.train.eval_every = 0
  c.train.checkpoint_every = 0
  c.train.progress = False
  return config_lib.finalize(c, overrides)
