"""Forecasting: predict the next ``horizon`` values of a series from a window of its past, and
say how much better that is than the naive persistence forecast, in the data's own units."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from deepflow.data.pipeline import INPUTS, TARGETS
from deepflow.registry import ConfigError, TASKS
from deepflow.tasks.supervised import Regression


@TASKS.register("forecasting")
class Forecasting(Regression):
  """Windows ``inputs`` (B, window) or (B, window, F) -> ``targets`` (B, horizon), as the
  bundled series (co2, sunspots) give them; trained with MSE on the preprocessed targets.

  Eval reports ``mse``, ``rmse`` and ``mae`` in the dataset's units (the fitted transforms
  inverted: ppm for co2, not standard deviations) beside the naive persistence forecast on the
  same examples (the window's last value repeated over the horizon: ``persistence_rmse``, ...)
  and their ratios (``rmse_ratio`` < 1: the model beats persistence); ``loss`` stays the MSE of
  the preprocessed targets (the training objective).

  ``feature``: which input feature is the forecast series (its last value is the persistence
  forecast). ``residual``: the model sees the window relative to its last values and predicts
  the change from the series' last value, so a trend that carries the test period beyond the
  train range moves no input out of what training saw; it needs that series and the targets in
  the same units (normalize them together: ``dict(name='standardize', keys=('input',
  'target'))``)."""

  OPTIONS = {"feature": 0, "residual": False}

  def __init__(self, config, spec):
    super().__init__(config, spec)
    if len(spec.input_shape) not in (1, 2):
      raise ConfigError(f"task 'forecasting' needs windows of shape (time,) or (time, features), "
                        f"got examples of shape {spec.input_shape} from {config.data.source}")
    feature, features = self.options["feature"], (spec.input_shape[1:] or (1,))[0]
    if not isinstance(feature, int) or isinstance(feature, bool) or not 0 <= feature < features:
      raise ConfigError(f"task.feature must be an input feature index in [0, {features}), "
                        f"got {feature!r}")
    if not isinstance(self.options["residual"], bool):
      raise ConfigError(f"task.residual must be True or False, got {self.options['residual']!r}")
    self.to_units = {key: spec.inverse.get(key, lambda x: x) for key in (INPUTS, TARGETS)}
    for key, fn in self.to_units.items():
      if fn is None:
        raise ConfigError(f"task 'forecasting' reports errors in the data's units, but a transform "
                          f"on the {key} has no inverse; use standardize or minmax there")
    if self.options["residual"] and not self._same_units():
      raise ConfigError("task.residual needs the input series and the targets in the same units; "
                        "normalize them together: dict(name='standardize', keys=('input', "
                        "'target'))")

  def _same_units(self) -> bool:
    """Whether the input series and the targets map back to the data's units alike (checked on
    two probe values: the maps are affine)."""
    probe = np.array([0.0, 1.0], np.float32)
    window = np.zeros((2, *self.spec.input_shape), np.float32)
    window[:, -1, ...] = probe.reshape((2,) + (1,) * (window.ndim - 2))
    as_input = self.last_value(np.asarray(self.to_units[INPUTS](window)))
    as_target = np.asarray(self.to_units[TARGETS](np.tile(probe[:, None],
                                                          (1, *self.spec.target_shape))))
    return np.allclose(as_input[:, None], as_target.reshape(2, -1), rtol=1e-5, atol=1e-5)

  def last_value(self, inputs):
    """The forecast series' last value in each window (B,)."""
    return inputs[:, -1, self.options["feature"]] if inputs.ndim == 3 else inputs[:, -1]

  def predict(self, params, model_state, inputs, rng, train):
    if not self.options["residual"]:
      return super().predict(params, model_state, inputs, rng, train)
    # Every feature relative to its own last value; the forecast is the series' last plus change.
    change, model_state = super().predict(params, model_state, inputs - inputs[:, -1:], rng,
                                          train)
    return self.last_value(inputs)[:, None] + change, model_state

  def eval_outputs(self, params, model_state, batch):
    pred, _ = self.predict(params, model_state, batch[INPUTS], None, False)
    target = batch[TARGETS].reshape(pred.shape).astype(pred.dtype)
    shape = batch[TARGETS].shape
    pred_units, target_units = (self.to_units[TARGETS](x.reshape(shape)).reshape(pred.shape)
                                for x in (pred, target))
    persistence = self.last_value(self.to_units[INPUTS](batch[INPUTS].astype(jnp.float32)))
    errors = {"": pred_units - target_units, "persistence_": persistence[:, None] - target_units}
    outputs = {"loss": jnp.mean((pred - target) ** 2, axis=-1)}
    for prefix, err in errors.items():
      outputs[f"{prefix}mse"] = jnp.mean(err ** 2, axis=-1)
      outputs[f"{prefix}mae"] = jnp.mean(jnp.abs(err), axis=-1)
    return outputs

  def summarize(self, outputs):
    metrics = {k: float(np.mean(v, dtype=np.float64)) for k, v in outputs.items()}
    for prefix in ("", "persistence_"):
      metrics[f"{prefix}rmse"] = float(np.sqrt(metrics[f"{prefix}mse"]))
    for name in ("rmse", "mae"):
      base = metrics[f"persistence_{name}"]
      metrics[f"{name}_ratio"] = metrics[name] / base if base > 0 else float("nan")
    return metrics
