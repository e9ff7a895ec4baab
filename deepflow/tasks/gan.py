"""Generative adversarial training: a generator and a discriminator updated simultaneously in one
jitted step, each by its own optimizer, and scored by a frozen reference classifier (``deepflow.analysis.reference``).

The step stays generic: ``trained_grads`` returns ``{'generator': dG, 'discriminator': dD}``
(each player's gradient of its own loss, from one forward pass) and ``learning_rates`` names the
two players, which the experiment gives an optimizer each (one ``optax.multi_transform``), so
the step's single ``tx.update`` is two optimizer steps.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from deepflow.analysis.reference import ReferenceClassifier
from deepflow.data.pipeline import INPUTS, TARGETS
from deepflow.models import gan as gan_lib
from deepflow.registry import ConfigError, TASKS
from deepflow.tasks.base import Task

GENERATOR, DISCRIMINATOR = "generator", "discriminator"
PLAYERS = (GENERATOR, DISCRIMINATOR)
SAMPLE_OPTIONS = ("prompt", "temperature")
# Eval latents come from this key folded with each example's pixels (see ``eval_outputs``).
EVAL_KEY = 0


@TASKS.register("gan")
class GAN(Task):
  """A two-player game on images (model ``dcgan``, which holds both networks).

  Each train step draws latents, generates a batch for the real batch's labels (a
  class-conditional model, ``model.num_classes`` = the dataset's classes) or unconditionally
  (``num_classes=0``), runs the discriminator once on real and generated images together, and
  takes each player's gradient of its own ``loss`` ('non_saturating' or 'hinge', see
  ``deepflow.models.gan``): simultaneous updates. ``generator_learning_rate`` and
  ``discriminator_learning_rate`` replace ``optimizer.learning_rate`` for that player (None keeps
  it; 0 freezes the player); every other ``optimizer`` option is shared (DCGAN: adam, b1=0.5).
  Logged ``loss`` is the sum of the two players' losses (what the non-finite guard watches).

  Eval, per real example: the discriminator's verdict on it and on a sample generated for its
  label, so ``d_real_accuracy``/``d_fake_accuracy`` say how well D separates them. With
  ``reference_steps > 0`` (and a labelled dataset), a reference classifier (``ReferenceClassifier``)
  scores the samples: ``sample_accuracy`` (it recognises the class each sample was generated for;
  conditional models only) beside ``real_accuracy`` (its accuracy on the real images: the
  ceiling), and ``frechet_distance`` between generated images and the train split in its
  feature space beside ``real_frechet_distance`` (the real eval images': the floor at this sample
  size).

  Parameter penalties (l1, l2) and optimizer-side regularizers (gradient noise, max-norm) apply
  to both players (a regex on ``generator/`` or ``discriminator/`` picks one); batch ones (label
  smoothing, mixup) do not fit a GAN and are refused."""

  OPTIONS = {"loss": "non_saturating", "generator_learning_rate": None,
             "discriminator_learning_rate": None, "reference_steps": 500}
  NO_BATCH_REGULARIZERS = ""

  def __init__(self, config, spec):
    super().__init__(config, spec)
    model = self.model
    if not all(hasattr(model, m) for m in ("generate", "discriminate", "latent_dim")):
      raise ConfigError(f"task 'gan' needs a generator/discriminator model such as 'dcgan', "
                        f"got {config.model.name!r}")
    self.kind = self.options["loss"]
    if self.kind not in gan_lib.LOSSES:
      raise ConfigError(f"task.loss must be one of {', '.join(gan_lib.LOSSES)}, got {self.kind!r}")
    if tuple(model.image_shape) != tuple(spec.input_shape):
      raise ConfigError(f"model.image_shape {tuple(model.image_shape)} does not match the data's "
                        f"images {tuple(spec.input_shape)}; set "
                        f"model.image_shape={tuple(spec.input_shape)}")
    self.num_classes = int(model.num_classes)
    if self.num_classes and self.num_classes != spec.num_classes:
      raise ConfigError(f"model.num_classes={self.num_classes}: a class-conditional GAN needs the "
                        f"dataset's number of classes ({spec.num_classes}), or 0 for an "
                        f"unconditional one")
    self.rates = {p: self._rate(p) for p in PLAYERS}
    steps = self.options["reference_steps"]
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
      raise ConfigError(f"task.reference_steps must be an integer >= 0, got {steps!r}")
    self.reference_steps = steps if spec.num_classes else 0  # it learns the dataset's labels
    self._generate = jax.jit(self._generate_images)

  def _rate(self, player: str) -> float:
    rate = self.options[f"{player}_learning_rate"]
    if rate is None:
      return self.config.optimizer.learning_rate
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or rate < 0:
      raise ConfigError(f"task.{player}_learning_rate must be None or a number >= 0, got {rate!r}")
    return float(rate)

  # -- building ----------------------------------------------------------------------------------

  def num_outputs(self) -> int:
    return self.spec.num_classes or 1  # unused by the model (see DCGAN)

  def learning_rates(self) -> dict[str, float]:
    """One optimizer per player (``optimizer`` with that player's learning rate), applied to
    its own parameter sub-tree (``deepflow.train.update.optimizer``)."""
    return dict(self.rates)

  def example_args(self) -> tuple[jax.Array, ...]:
    return self.example_inputs(), jnp.zeros((1,), jnp.int32)  # images and their labels

  # -- the two players ---------------------------------------------------------------------------

  def _labels(self, batch: Mapping[str, jax.Array]) -> jax.Array | None:
    return batch[TARGETS].astype(jnp.int32) if self.num_classes else None

  def run(self, params, model_state, method: str, x: jax.Array, labels: jax.Array | None,
          rng: jax.Array | None, *, train: bool):
    """One network (``method``: 'generate' or 'discriminate') through ``Task.apply``: in the
    compute dtype; in training also the updated mutable collections (whole: the caller keeps
    its network's sub-tree)."""
    return self.apply(params, model_state, x, rng, train=train, method=method, extra=(labels,))

  def latents(self, rng: jax.Array, num: int) -> jax.Array:
    return jax.random.normal(rng, (num, self.model.latent_dim), jnp.float32)

  def trained_grads(self, trained, params_of, model_state, batch, rng):
    """Each player's gradient of its own loss w.r.t. its trained parameters, from one generator
    and one discriminator pass (real and generated images in one batch): one VJP of the same
    forward per player, so the updates are simultaneous. XLA drops the halves not kept (D's loss
    w.r.t. G and vice versa); a player whose learning rate is 0 is not differentiated at all,
    nor is any parameter ``optimizer.freeze`` names (both get zeros)."""
    real, labels = batch[INPUTS].astype(jnp.float32), self._labels(batch)
    z_rng, g_rng, d_rng = jax.random.split(rng, 3)
    z = self.latents(z_rng, real.shape[0])
    both_labels = None if labels is None else jnp.repeat(labels, 2)
    # Real and generated images interleaved (rows 2i, 2i+1), not stacked along the batch: each
    # device keeps its own rows, where stacking would move half of them between devices.
    interleave = lambda a, b: jnp.stack([a, b], axis=1).reshape(-1, *a.shape[1:])  # noqa: E731

    moving = {p: trained[p] for p in PLAYERS if p in trained and self.rates[p]}

    def losses(moving):
      params = params_of({**trained, **moving})  # the players not moving are constants
      fake, g_state = self.run(params, model_state, "generate", z, labels, g_rng, train=True)
      logits, d_state = self.run(params, model_state, "discriminate", interleave(real, fake),
                                 both_labels, d_rng, train=True)
      real_logits, fake_logits = logits[0::2], logits[1::2]
      d_loss = gan_lib.discriminator_loss(real_logits, fake_logits, self.kind)
      g_loss = gan_lib.generator_loss(fake_logits, self.kind)
      metrics = {"d_loss": d_loss, "g_loss": g_loss,
                 "d_real_accuracy": jnp.mean(real_logits > 0),
                 "d_fake_accuracy": jnp.mean(fake_logits < 0)}
      return (d_loss, g_loss), (metrics, _per_player(g_state, d_state))

    (d_loss, g_loss), vjp, (metrics, new_state) = jax.vjp(losses, moving, has_aux=True)
    own = {DISCRIMINATOR: (jnp.ones_like(d_loss), jnp.zeros_like(g_loss)),
           GENERATOR: (jnp.zeros_like(d_loss), jnp.ones_like(g_loss))}
    grads = {p: vjp(own[p])[0][p] if p in moving else jax.tree.map(jnp.zeros_like, trained[p])
             for p in trained}
    return grads, new_state, {"loss": d_loss + g_loss, **metrics}

  # -- evaluation --------------------------------------------------------------------------------

  def eval_outputs(self, params, model_state, batch):
    """Per real example: D's logits on it and on a sample generated for its label. Eval has no
    randomness of its own, so each example's latent comes from a key folded with its pixels:
    an evaluation is deterministic and independent of the batch size. With the reference
    classifier on, the images themselves too (it scores them on the host, in ``summarize``)."""
    real, labels = batch[INPUTS].astype(jnp.float32), self._labels(batch)
    pixels = jax.lax.bitcast_convert_type(real.reshape(real.shape[0], -1), jnp.uint32).sum(-1)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(EVAL_KEY), pixels)
    z = jax.vmap(lambda k: jax.random.normal(k, (self.model.latent_dim,)))(keys)
    fake, _ = self.run(params, model_state, "generate", z, labels, None, train=False)
    real_logits, _ = self.run(params, model_state, "discriminate", real, labels, None, train=False)
    fake_logits, _ = self.run(params, model_state, "discriminate", fake, labels, None,
                              train=False)
    one = lambda f, *a: jax.vmap(lambda *x: f(*(v[None] for v in x), self.kind))(*a)  # noqa: E731
    outputs = {"d_loss": one(gan_lib.discriminator_loss, real_logits, fake_logits),
               "g_loss": one(gan_lib.generator_loss, fake_logits),
               "d_real_accuracy": (real_logits > 0).astype(jnp.float32),
               "d_fake_accuracy": (fake_logits < 0).astype(jnp.float32)}
    if self.reference_steps:
      outputs.update(real_images=real, fake_images=fake,
                     label=batch[TARGETS].astype(jnp.int32))
    return outputs

  def summarize(self, outputs):
    outputs = dict(outputs)
    real, fake = outputs.pop("real_images", None), outputs.pop("fake_images", None)
    labels = outputs.pop("label", None)
    metrics = super().summarize(outputs)
    metrics["loss"] = metrics["d_loss"] + metrics["g_loss"]
    metrics["d_accuracy"] = (metrics["d_real_accuracy"] + metrics["d_fake_accuracy"]) / 2
    if real is not None:
      reference = self.reference()
      real_logits, real_features = reference.classify(real)
      fake_logits, fake_features = reference.classify(fake)
      metrics["real_accuracy"] = float(np.mean(real_logits.argmax(-1) == labels))
      if self.num_classes:
        metrics["sample_accuracy"] = float(np.mean(fake_logits.argmax(-1) == labels))
      metrics["frechet_distance"] = reference.frechet_distance(fake_features)
      metrics["real_frechet_distance"] = reference.frechet_distance(real_features)
    return metrics

  def reference(self) -> ReferenceClassifier:
    """The frozen scorer of this run's data (trained on first use; see ``ReferenceClassifier``)."""
    return ReferenceClassifier.for_data(self.config.data, self.reference_steps,
                                        self.config.seed)

  # -- generation (``deepflow sample``) ----------------------------------------------------------

  def _generate_images(self, params, model_state, z, labels):
    return self.run(params, model_state, "generate", z, labels, None, train=False)[0]

  def sample(self, params, model_state, rng, num: int, **options: Any) -> dict[str, np.ndarray]:
    """``num`` generated images (num, H, W, C), in the model's (preprocessed) units. ``prompt``:
    the class(es) to draw for a conditional model, an int or a comma-separated list cycled over
    the samples (default: every class in turn); ``temperature``: the latents' standard deviation
    (default 1; below 1 trades variety for typical samples). Also returns their ``labels``."""
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(SAMPLE_OPTIONS))
    if unknown:
      raise ConfigError(f"task 'gan' has no sample option {', '.join(unknown)}; options: "
                        f"{', '.join(SAMPLE_OPTIONS)}")
    if not isinstance(num, int) or isinstance(num, bool) or num < 1:
      raise ConfigError(f"the number of samples must be a positive integer, got {num!r}")
    try:
      temperature = float(options.get("temperature", 1.0))
    except (TypeError, ValueError):
      temperature = -1.0
    if not temperature >= 0:
      raise ConfigError(f"sample option temperature must be a number >= 0, got "
                        f"{options['temperature']!r}")
    classes = self._sample_classes(options.get("prompt"))
    labels = None if classes is None else np.resize(classes, num).astype(np.int32)
    z = self.latents(rng, num) * temperature
    images = self._generate(params, model_state, z, None if labels is None else jnp.asarray(labels))
    out = {"images": np.asarray(images, np.float32)}
    if labels is not None:
      out["labels"] = labels
    return out

  def _sample_classes(self, prompt) -> np.ndarray | None:
    if not self.num_classes:
      if prompt is not None:
        raise ConfigError("sample option prompt (the classes to draw) needs a class-conditional "
                          "GAN (model.num_classes > 0)")
      return None
    if prompt is None:
      return np.arange(self.num_classes)
    if isinstance(prompt, str):  # from the command line: '3' or '0,1,2'
      items = prompt.replace(" ", "").strip("[]()").split(",")
    else:
      items = np.atleast_1d(prompt).tolist()
    try:
      classes = np.asarray([int(c) for c in items])
    except (TypeError, ValueError):
      classes = np.asarray([-1])
    if classes.size == 0 or classes.min() < 0 or classes.max() >= self.num_classes:
      raise ConfigError(f"sample option prompt must name classes in 0..{self.num_classes - 1} "
                        f"(e.g. 3 or 0,1,2), got {prompt!r}")
    return classes


def _per_player(g_state: Mapping[str, Any], d_state: Mapping[str, Any]) -> dict[str, Any]:
  """Mutable collections (batch stats) after both passes: each network's own sub-tree from the
  pass that ran it (each pass returns the whole collection, the other network's unchanged)."""
  return {name: {GENERATOR: g_state[name][GENERATOR], DISCRIMINATOR: d_state[name][DISCRIMINATOR]}
          for name in g_state}
