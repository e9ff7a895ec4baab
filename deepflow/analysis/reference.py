"""A reference classifier: a fixed yardstick for generated images (what the GAN task scores its
samples with), and the Fréchet distance between Gaussians fitted to features.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from deepflow import models  # noqa: F401  (fills MODELS)
from deepflow.atomic import write_atomic
from deepflow.data import sources, transforms as transforms_lib
from deepflow.registry import MODELS

log = logging.getLogger("deepflow")


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
      write_atomic(path, serialization.msgpack_serialize({
          "variables": jax.device_get(variables), "num_classes": num_classes,
          "train_mean": reference.train_mean, "train_cov": reference.train_cov}))
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
  stats = transforms_lib.fit_chain(chain, lambda: [train], dataset.input_key,
                                   dataset.target_key)
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
