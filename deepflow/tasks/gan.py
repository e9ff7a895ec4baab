"""Generative adversarial training: a generator and a discriminator updated simultaneously in one
jitted step, each by its own optimizer, and scored by a frozen reference classifier.

The loop stays generic: ``grads`` returns ``{'generator': dG, 'discriminator': dD}`` (each
player's gradient of its own loss, from one forward pass) and ``optimizer`` is an
``optax.multi_transform`` that sends each sub-tree to its player's optimizer, so the loop's
single ``tx.update`` is two optimizer steps.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import threading
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from deepflow.data import sources, transforms as transforms_lib
from deepflow.data.pipeline import INPUTS, TARGETS
from deepflow.models import gan as gan_lib
from deepflow.optim import build_optimizer
from deepflow.pytree import cast_floats
from deepflow.registry import ConfigError, MODELS, TASKS
from deepflow.tasks.base import Task

log = logging.getLogger("deepflow")

GENERATOR, DISCRIMINATOR = "generator", "discriminator"
PLAYERS = (GENERATOR, DISCRIMINATOR)
SAMPLE_OPTIONS = ("prompt", "temperature")
SAMPLES_PNG, SAMPLES_NPZ = "samples.png", "samples.npz"
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

  def __init__(self, config, spec):
    super().__init__(config, spec)
    model = self.model
    if not all(hasattr(model, m) for m in ("generate", "discriminate", "latent_dim")):
      raise ConfigError(f"task 'gan' needs a generator/discriminator model such as 'dcgan', "
                        f"got {config.model.name!r}")
    self.kind = self.options_["loss"]
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
    if self.regularizer.batch is not None:
      raise ConfigError("task 'gan' takes no batch regularizers (label smoothing, mixup, cutmix)")
    self.rates = {p: self._rate(p) for p in PLAYERS}
    steps = self.options_["reference_steps"]
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
      raise ConfigError(f"task.reference_steps must be an integer >= 0, got {steps!r}")
    self.reference_steps = steps if spec.num_classes else 0  # it learns the dataset's labels
    self._generate = jax.jit(self._generate_images)

  def _rate(self, player: str) -> float:
    rate = self.options_[f"{player}_learning_rate"]
    if rate is None:
      return self.config.optimizer.learning_rate
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or rate < 0:
      raise ConfigError(f"task.{player}_learning_rate must be None or a number >= 0, got {rate!r}")
    return float(rate)

  # -- building ----------------------------------------------------------------------------------

  def num_outputs(self) -> int:
    return self.spec.num_classes or 1  # unused by the model (see DCGAN)

  def optimizer(self, total_steps: int) -> optax.GradientTransformation:
    """One optimizer per player (``optimizer`` with that player's learning rate), applied to
    its own parameter sub-tree by ``multi_transform``."""
    players = {}
    for player, rate in self.rates.items():
      if rate == 0:  # frozen; also spares schedules that divide by the rate (cosine's alpha)
        players[player] = optax.set_to_zero()
        continue
      c = ml_collections.ConfigDict(self.config.optimizer.to_dict())
      c.learning_rate = rate
      players[player] = build_optimizer(c, total_steps, gradient=self.regularizer.gradient,
                                        projection=self.regularizer.projection)
    return optax.multi_transform(players, {p: p for p in PLAYERS})

  def init(self, rng):
    params_rng, dropout_rng = jax.random.split(rng)
    variables = self.model.init({"params": params_rng, "dropout": dropout_rng},
                                self.example_inputs(), jnp.zeros((1,), jnp.int32), train=False)
    variables = dict(variables)
    return variables.pop("params"), variables

  # -- the two players ---------------------------------------------------------------------------

  def _labels(self, batch: Mapping[str, jax.Array]) -> jax.Array | None:
    return batch[TARGETS].astype(jnp.int32) if self.num_classes else None

  def run(self, params, model_state, method: str, x: jax.Array, labels: jax.Array | None,
          rng: jax.Array | None, *, train: bool):
    """One network (``method``: 'generate' or 'discriminate') in the compute dtype; in training
    also the updated mutable collections (whole: the caller keeps its network's sub-tree)."""
    params, x = cast_floats((params, x), self.compute_dtype)
    variables = {"params": params, **model_state}
    rngs = {"dropout": rng} if rng is not None else {}
    if train and model_state:
      out, new_state = self.model.apply(variables, x, labels, train=True, rngs=rngs,
                                        method=method, mutable=list(model_state))
    else:
      out, new_state = self.model.apply(variables, x, labels, train=train, rngs=rngs,
                                        method=method), model_state
    return cast_floats(out, jnp.float32), new_state

  def latents(self, rng: jax.Array, num: int) -> jax.Array:
    return jax.random.normal(rng, (num, self.model.latent_dim), jnp.float32)

  def grads(self, params, model_state, batch, rng):
    """Each player's gradient of its own loss, from one generator and one discriminator pass
    (real and generated images in one batch): two VJPs of the same forward, so the updates are
    simultaneous. XLA drops the halves not kept (D's loss w.r.t. G and vice versa)."""
    real, labels = batch[INPUTS].astype(jnp.float32), self._labels(batch)
    z_rng, g_rng, d_rng = jax.random.split(rng, 3)
    z = self.latents(z_rng, real.shape[0])
    both_labels = None if labels is None else jnp.repeat(labels, 2)
    # Real and generated images interleaved (rows 2i, 2i+1), not stacked along the batch: each
    # device keeps its own rows, where stacking would move half of them between devices.
    interleave = lambda a, b: jnp.stack([a, b], axis=1).reshape(-1, *a.shape[1:])  # noqa: E731

    def losses(params):
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

    (d_loss, g_loss), vjp, (metrics, new_state) = jax.vjp(losses, params, has_aux=True)
    (d_grads,) = vjp((jnp.ones_like(d_loss), jnp.zeros_like(g_loss)))
    (g_grads,) = vjp((jnp.zeros_like(d_loss), jnp.ones_like(g_loss)))
    grads = {GENERATOR: g_grads[GENERATOR], DISCRIMINATOR: d_grads[DISCRIMINATOR]}
    loss = d_loss + g_loss
    if self.regularizer.penalty is not None:  # separable: each player gets its own part
      penalty, penalty_grads = jax.value_and_grad(self.regularizer.penalty)(params)
      grads = jax.tree.map(jnp.add, grads, penalty_grads)
      loss, metrics = loss + penalty, {**metrics, "penalty": penalty}
    return grads, new_state, {"loss": loss, **metrics}

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

  def reference(self) -> "ReferenceClassifier":
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

  def save_samples(self, samples: Mapping[str, np.ndarray], directory: str) -> list[str]:
    """``samples.png``, the images as a grid (one row per class for a conditional GAN), and
    ``samples.npz``, the arrays as ``sample`` returned them."""
    epath.Path(directory).mkdir(parents=True, exist_ok=True)
    png, npz = os.path.join(directory, SAMPLES_PNG), os.path.join(directory, SAMPLES_NPZ)
    labels = samples.get("labels")
    save_image_grid(png, samples["images"], labels,
                    title=f"{len(samples['images'])} samples of {self.config.model.name} on "
                          f"{self.config.data.source}")
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in samples.items()})
    epath.Path(npz).write_bytes(buffer.getvalue())
    return [png, npz]


def _per_player(g_state: Mapping[str, Any], d_state: Mapping[str, Any]) -> dict[str, Any]:
  """Mutable collections (batch stats) after both passes: each network's own sub-tree from the
  pass that ran it (each pass returns the whole collection, the other network's unchanged)."""
  return {name: {GENERATOR: g_state[name][GENERATOR], DISCRIMINATOR: d_state[name][DISCRIMINATOR]}
          for name in g_state}


# ------------------------------------------------------------------------------------------------
# The reference classifier: a fixed yardstick for generated images.
# ------------------------------------------------------------------------------------------------

REFERENCE_MODEL = dict(name="cnn", features=(32, 64), dense=(128,))
REFERENCE_VERSION = 1   # bump when the recipe below changes: cached classifiers are then retrained
REFERENCE_BATCH = 128
REFERENCE_DIR = "deepflow_reference"


class ReferenceClassifier:
  """A small CNN (``REFERENCE_MODEL``) trained on the train split of the GAN's data, preprocessed
  the same way, that scores generated images: its predicted class, and its last hidden layer as
  the feature space of a Fréchet distance (FID's formula, with this network in place of
  Inception, which neither fits 8x8 digits nor ships offline).

  It depends on the data config and ``steps`` only, not on the run's seed (it is trained from
  seed 0; synthetic data, drawn from the run's seed, excepted), so runs and seeds are scored by
  the same yardstick. Trained once (digits, 500 steps: 98.9% on the test split), then kept in the
  process and cached in the TFDS data dir (``deepflow_reference/KEY.msgpack``), so a resumed run,
  ``deepflow eval`` and later runs reuse the same weights rather than retrain."""

  _memo: dict[str, "ReferenceClassifier"] = {}
  _lock = threading.Lock()

  def __init__(self, variables: Any, num_classes: int, train_mean: np.ndarray,
               train_cov: np.ndarray):
    self.model = MODELS.get(REFERENCE_MODEL["name"])(
        num_outputs=num_classes, **{k: v for k, v in REFERENCE_MODEL.items() if k != "name"})
    self.variables = variables
    self.train_mean, self.train_cov = train_mean, train_cov
    hidden = f"Dense_{len(REFERENCE_MODEL['dense']) - 1}"  # the last hidden layer (pre-act.)

    def forward(variables, x):
      logits, state = self.model.apply(variables, x, capture_intermediates=(
          lambda module, method: module.name == hidden), mutable=["intermediates"])
      features = state["intermediates"][hidden]["__call__"][0]
      return logits, jax.nn.relu(features)  # the CNN's default activation after that layer
    self._forward = jax.jit(forward)

  @classmethod
  def for_data(cls, data_config: Any, steps: int, seed: int = 0) -> "ReferenceClassifier":
    """The reference classifier of ``data_config``'s train split: from the process, the cache
    in the data dir, or trained now (a few seconds for digits). ``seed`` is the run's: only
    synthetic data depends on it (their examples are drawn from it)."""
    seed = seed if sources.parse_source(data_config.source)[0] == "synthetic" else 0
    key = _reference_key(data_config, steps, seed)
    with cls._lock:
      if key not in cls._memo:
        cls._memo[key] = cls._load_or_train(data_config, steps, seed, key)
      return cls._memo[key]

  @classmethod
  def _load_or_train(cls, data_config: Any, steps: int, seed: int,
                     key: str) -> "ReferenceClassifier":
    from flax import serialization
    data_dir = data_config.data_dir or sources.default_data_dir()
    path = epath.Path(data_dir) / REFERENCE_DIR / f"{key}.msgpack"
    if path.exists():
      saved = serialization.msgpack_restore(path.read_bytes())
      return cls(saved["variables"], int(saved["num_classes"]), saved["train_mean"],
                 saved["train_cov"])
    images, labels, num_classes = _train_split(data_config, seed)
    log.info("training the reference classifier on %s (%d steps, once)", data_config.source, steps)
    variables = _fit_reference(images, labels, num_classes, steps)
    reference = cls(variables, num_classes, np.zeros(1), np.zeros((1, 1)))
    _, features = reference.classify(images)
    reference.train_mean, reference.train_cov = _moments(features)
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.parent / f"{key}.tmp{os.getpid()}"
      tmp.write_bytes(serialization.msgpack_serialize({
          "variables": jax.device_get(variables), "num_classes": num_classes,
          "train_mean": reference.train_mean, "train_cov": reference.train_cov}))
      tmp.rename(path)
    except OSError as e:  # a read-only data dir: keep it in this process only
      log.warning("could not cache the reference classifier in %s: %s", path.parent, e)
    return reference

  def classify(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, features) of ``images`` (N, H, W, C), in fixed-size batches (one compilation)."""
    images = np.asarray(images, np.float32)
    n = len(images)
    padded = np.concatenate([images, np.zeros((-n % REFERENCE_BATCH, *images.shape[1:]),
                                              np.float32)])
    parts = [self._forward(self.variables, padded[i:i + REFERENCE_BATCH])
             for i in range(0, len(padded), REFERENCE_BATCH)]
    logits, features = (np.concatenate([np.asarray(p[j]) for p in parts])[:n] for j in (0, 1))
    return logits, features

  def frechet_distance(self, features: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to ``features`` and to the train split's."""
    mean, cov = _moments(features)
    return frechet_distance(mean, cov, self.train_mean, self.train_cov)


def _reference_key(data_config: Any, steps: int, seed: int) -> str:
  """A name for the classifier: a hash of everything that decides its weights."""
  recipe = {"version": REFERENCE_VERSION, "model": REFERENCE_MODEL, "steps": steps, "seed": seed,
            "source": data_config.source, "split": data_config.train_split,
            "transforms": [dict(t) for t in data_config.transforms]}
  digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()
  return digest[:16]


def _train_split(data_config: Any, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
  """The train split's images and labels, preprocessed as the pipeline does for evaluation
  (fitted transforms, no augmentation): the units the generator produces."""
  dataset = sources.open_dataset(data_config, seed=seed)
  train = sources.to_memory(dataset.split(data_config.train_split)).arrays
  chain = transforms_lib.build_transforms(data_config.transforms)
  stats = transforms_lib.fit_chain(chain, train, dataset.input_key, dataset.target_key)
  batch = transforms_lib.apply_chain(chain, stats, train, dataset.input_key, dataset.target_key,
                                     train=False)
  return (np.asarray(batch[dataset.input_key], np.float32),
          np.asarray(batch[dataset.target_key]).astype(np.int32), int(dataset.num_classes))


def _fit_reference(images: np.ndarray, labels: np.ndarray, num_classes: int, steps: int) -> Any:
  """Adam on softmax cross-entropy, ``steps`` batches drawn from seed 0: deterministic."""
  model = MODELS.get(REFERENCE_MODEL["name"])(
      num_outputs=num_classes, **{k: v for k, v in REFERENCE_MODEL.items() if k != "name"})
  variables = model.init(jax.random.PRNGKey(0), jnp.asarray(images[:1]))
  tx = optax.adam(2e-3)
  opt_state = tx.init(variables)

  @jax.jit
  def step(variables, opt_state, x, y):
    def loss(v):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply(v, x), y).mean()
    grads = jax.grad(loss)(variables)
    updates, opt_state = tx.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state

  rng = np.random.default_rng(0)
  size = min(REFERENCE_BATCH, len(images))
  for _ in range(steps):
    idx = rng.choice(len(images), size, replace=False)
    variables, opt_state = step(variables, opt_state, images[idx], labels[idx])
  return variables


def _moments(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  features = np.asarray(features, np.float64)
  return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mean1: np.ndarray, cov1: np.ndarray, mean2: np.ndarray,
                     cov2: np.ndarray) -> float:
  """||m1 - m2||^2 + Tr(C1 + C2 - 2 (C1 C2)^1/2): the 2-Wasserstein distance between two
  Gaussians, FID's formula (Heusel et al., 2017). The trace of the root is taken as that of
  (C1^1/2 C2 C1^1/2)^1/2, a symmetric matrix with the same eigenvalues, from eigenvalues clipped
  at 0: stable where features are degenerate (dead units give singular covariances), where
  a general matrix square root warns and turns complex."""
  def psd_root(matrix):
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
  root1 = psd_root(np.asarray(cov1, np.float64))
  inner = np.linalg.eigvalsh(root1 @ np.asarray(cov2, np.float64) @ root1)
  trace_root = np.sum(np.sqrt(np.clip(inner, 0, None)))
  return float(np.sum((np.asarray(mean1) - np.asarray(mean2)) ** 2) + np.trace(cov1) +
               np.trace(cov2) - 2 * trace_root)


# ------------------------------------------------------------------------------------------------
# Image grids.
# ------------------------------------------------------------------------------------------------

def save_image_grid(path: str | os.PathLike, images: np.ndarray,
                    labels: Sequence[int] | None = None, *, title: str | None = None) -> str:
  """Writes images (N, H, W, C) as one PNG mosaic: with ``labels``, one row per class (labelled
  on the left), else a near-square grid. Values are scaled to [0, 1] over the whole grid, from
  its 0.5th to its 99.5th percentile (the images are in preprocessed units), so intensities stay
  comparable between cells.
  Matplotlib's Agg canvas on a bare ``Figure``: headless, and no pyplot state."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ConfigError(f"an image grid needs (N, H, W, C) images, got shape {images.shape}")
  lo, hi = (float(v) for v in np.percentile(images, [0.5, 99.5]))  # outliers can't grey it all
  images = np.clip((images - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(images)

  if images.shape[-1] not in (1, 3):  # neither grey nor RGB: show the channel mean
    images = images.mean(-1, keepdims=True)
  if labels is not None:
    labels = np.asarray(labels)
    rows = [images[labels == c] for c in np.unique(labels)]
    row_names = [str(c) for c in np.unique(labels)]
  else:
    cols = math.ceil(math.sqrt(len(images)))
    rows = [images[i:i + cols] for i in range(0, len(images), cols)]
    row_names = None
  n, (h, w, c) = max(len(r) for r in rows), images.shape[1:]
  gap = 1
  mosaic = np.ones((len(rows) * (h + gap) - gap, n * (w + gap) - gap, c), np.float32)
  for i, row in enumerate(rows):
    for j, image in enumerate(row):
      mosaic[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = image
  scale = min(0.25, 8.0 / max(mosaic.shape[:2]))  # inches per pixel: about 8 inches across
  fig = Figure(figsize=(mosaic.shape[1] * scale + 0.6, mosaic.shape[0] * scale + 0.6),
               layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  ax.imshow(mosaic[..., 0] if c == 1 else mosaic, cmap="gray", vmin=0.0, vmax=1.0,
            interpolation="nearest")
  ax.set_xticks([])
  if row_names is not None:
    ax.set_yticks([i * (h + gap) + (h - 1) / 2 for i in range(len(rows))], row_names)
    ax.set_ylabel("class")
  else:
    ax.set_yticks([])
  if title:
    ax.set_title(title, fontsize=9)
  fig.savefig(path, format="png", dpi=100)
  return os.fspath(path)
