"""The base config, experiment-file loading, ``KEY=VALUE`` overrides and validation.

An experiment file defines ``get_config()`` returning ``deepflow.config.base_config()`` with its
fields filled in. ``load_config`` calls it, fills in the defaults of the chosen model and task,
locks the result (so a typo in an override names the key) and validates it before anything is
compiled. Every user mistake raises ``ConfigError`` with one line.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import traceback
from typing import Any, Iterable

import ml_collections

from deepflow.registry import ConfigError

ConfigDict = ml_collections.ConfigDict


# Keys whose value may be of several types (made with ``_any_type``); validate() checks each.
ANY_TYPE_KEYS = ("data.cache",)
FREE_FORM_SECTIONS = ("model", "task", "train.xla_options")  # their keys are not the base's


def _any_type(default: Any) -> ml_collections.FieldReference:
  return ml_collections.FieldReference(default, field_type=object)


def base_config() -> ConfigDict:
  """Every key deepflow knows, with its default. Experiment files start from this."""
  c = ConfigDict()
  c.seed = 0                        # seeds initialisation, dropout and data order: same seed, same run
  c.task = ConfigDict({"name": "classification"})  # the objective; its options sit beside it
  c.model = ConfigDict({            # the architecture; its fields sit beside it
      "name": "mlp",                # see the model registry
      "init_from": "",              # start from trained weights (deepflow.train.init_from): a run 'RUN',
                                    # 'RUN:STEP' or 'RUN:best', an Orbax checkpoint directory, a
                                    # .safetensors or .npz file, 'hf:DIR' a Hugging Face
                                    # checkpoint (which sets the model's name and fields);
                                    # '' = a fresh initialisation
      "init_map": [],               # [(regex, replacement), ...]: renames the source's tensor
                                    # names ('params/...', 'batch_stats/...'), in order
      "init_skip": "",              # regex: parameters left freshly initialised (and source
                                    # tensors of that name ignored), e.g. a new head
      "init_layout": "deepflow",    # 'pytorch': the source is a PyTorch state_dict (conv OIHW,
                                    # Linear (out, in), dotted names; see deepflow.weights)
      "lora": ConfigDict({          # low-rank adapters (deepflow.models.lora); only they train
          "rank": 0,                # 0 = off
          "alpha": 1.0,             # the update is (alpha / rank) * A @ B
          "targets": r"kernel$",    # regex on parameter paths: the Dense/attention kernels adapted
      }),
      "quantization": "",           # quantization-aware training (deepflow.qat): 'int8' or 'int4'
                                    # weights, int8 activations; '' = float
  })
  c.data = ConfigDict({
      "source": "bundled:digits",   # 'bundled:NAME', 'tfds:NAME[/CONFIG][:VERSION]', 'synthetic:NAME'
      "data_dir": "",               # TFDS data dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
      "train_split": "train",       # read by training; the preprocessing is fitted on it
      "eval_split": "test",         # evaluated every train.eval_every steps and at the end
      "batch_size": 128,            # global batch, over all hosts and devices
      "eval_batch_size": 512,       # the last eval batch is padded and masked
      "transforms": [{"name": "standardize"}],  # preprocessing and augmentation, in order
      "cache": _any_type("auto"),   # hold splits in host memory: True, False, or 'auto' (if
                                    # the split's decoded size fits cache_budget_gb)
      "cache_budget_gb": 1.0,       # 'auto' caches a split whose estimated decoded size fits this
      "stats_examples": 10000,      # statistics and the NaN check use a seeded sample of this many
      "num_threads": 2,             # Grain reader threads (prefetching into the train step; none
                                    # for an in-memory split without per-example steps)
      "tokenizer": "",              # '' = the dataset's examples as stored (bundled:text: character
                                    # ids); else a text dataset (tfds:NAME or
                                    # bundled:text/documents), tokenized and packed (see
                                    # deepflow.data.text): 'byte', 'hf:DIR' (a Hugging Face
                                    # tokenizer.json), 'sentencepiece:PATH' or
                                    # 'sentencepiece:{bpe,unigram}:VOCAB_SIZE' (trained on train)
      "text_feature": "",           # with a tokenizer: the feature holding the text ('' = the only
                                    # Text feature)
      "seq_len": 256,               # with a tokenizer: tokens per packed row (<= model.max_len)
      "workers": 0,                 # worker processes reading and preprocessing train batches
  })
  c.optimizer = ConfigDict({
      "name": "adam",               # see the optimizer registry
      "learning_rate": 1e-3,        # peak learning rate of the schedule
      "schedule": "constant",       # constant, cosine, piecewise, exponential, linear
      "warmup_steps": 0,            # linear warmup from 0 to learning_rate, for any schedule
      "decay_steps": 0,             # 0 = train.steps
      "end_learning_rate": 0.0,     # cosine, linear: the rate the schedule ends at
      "boundaries": (),             # piecewise: steps at which the rate is multiplied by decay_rate
      "decay_rate": 0.1,            # piecewise: factor per boundary; exponential: per decay_steps
      "momentum": 0.9,              # sgd (0 = plain SGD), rmsprop
      "nesterov": False,            # sgd, rmsprop: Nesterov momentum
      "b1": 0.9,                    # adam family, lion: first-moment decay
      "b2": 0.999,                  # adam family, lion: second-moment decay; rmsprop: its decay
      "eps": 1e-8,                  # adam family, rmsprop, adagrad: denominator epsilon
      "weight_decay": 0.0,          # decoupled (adamw, lion, sgd+decay); masked by weight_decay_mask
      "weight_decay_mask": r"(kernel|embedding)$",  # regex on '/'-joined parameter paths
      "clip_norm": 0.0,             # global-norm gradient clipping; 0 = off
      "freeze": "",                 # regex on parameter paths: these are not trained ('' = none)
      "lr_multipliers": [],         # [(regex, factor), ...]: the first match scales a parameter's
                                    # learning rate (e.g. ('^head/', 10.0))
      "freeze_batch_stats": False,  # keep batch-norm running statistics as loaded (evaluation
                                    # uses them; training still normalizes by each batch's own)
  })
  c.regularizers = []              # [dict(name=..., **options), ...]: see the registry
  c.train = ConfigDict({
      "steps": 1000,                # optimizer updates in all; rerun with more to continue
      "microbatches": 1,            # gradient accumulation inside the step (lax.scan)
      "eval_every": 500,            # 0 = only at the end
      "log_every": 50,              # steps between train-metric lines (jsonl, TensorBoard)
      "checkpoint_every": 500,      # 0 = only at the end
      "keep_checkpoints": 3,        # how many of the latest checkpoints to keep
      "nonfinite": "stop",          # 'stop', or 'skip' (skip the update, stop after max_nonfinite)
      "max_nonfinite": 10,          # 'skip': consecutive non-finite steps before stopping
      "progress": True,             # show a progress bar (steps/s, ETA, loss)
      "compute_dtype": "float32",   # 'bfloat16': mixed precision (float32 master params)
      "profile_steps": (),          # (first, last): a jax.profiler trace of them in workdir/profile
      "compilation_cache": "~/.cache/deepflow/jax",  # JAX's persistent compilation cache
                                    # (a rerun loads its compiled steps); '' = off
      "xla_options": {},            # XLA compiler options of the train and eval steps, over
                                    # deepflow's per-platform defaults (deepflow.train.tuning)
      "autotune": False,            # CPU: time the train step under each XLA:CPU convolution
                                    # backend, keep the fastest (deepflow.train.tuning)
  })
  c.parallel = ConfigDict({
      "strategy": "data",           # 'data' (replicated params) or 'fsdp' (sharded over data)
      "fsdp_min_size": 2 ** 14,     # fsdp: leave arrays smaller than this replicated
      "rules": [],                  # [(regex on param path, PartitionSpec tuple), ...] first wins
  })
  c.mesh = ConfigDict({"shape": ConfigDict({
      "data": -1,                   # devices on the data-parallel axis (-1 = all that are left)
      "model": 1,                   # devices on the model (tensor-parallel) axis
  })})
  c.privacy = ConfigDict({          # DP-SGD (deepflow.privacy): see its docstring for the caveats
      "enabled": False,             # train with DP-SGD: per-example clipping + Gaussian noise
      "clip_norm": 1.0,             # bound on each example's gradient L2 norm
      "noise_multiplier": 0.0,      # noise std / clip_norm; 0 with a target_epsilon = calibrated
      "target_epsilon": 0.0,        # 0 = none; else a run whose train.steps would exceed it is
                                    # refused before it starts
      "delta": 1e-5,                # must be below 1 / train_size
      "accountant": "rdp",          # 'rdp' or 'pld' (dp-accounting)
      "sampling": "poisson",        # 'poisson': each example joins a step's batch with probability
                                    # batch_size / train_size (what the epsilon assumes); 'shuffle':
                                    # fixed-size shuffled batches (the epsilon is an approximation)
      "max_batch_size": 0,          # Poisson batches are padded to this many rows (0 = automatic: a
                                    # size exceeded with negligible probability over the run)
      "clipping": "auto",           # per-example norms: 'ghost' (from the inputs and output
                                    # gradients of dense, conv, embedding, norm, position and
                                    # class-token layers), 'vmap' (per-example gradients),
                                    # 'auto' = ghost when every parameter is in such a layer
  })
  return c


# ------------------------------------------------------------------------------------------------
# Loading and overrides.
# ------------------------------------------------------------------------------------------------

def load_config(path: str | os.PathLike, overrides: Iterable[str] = (),
                num_devices: int | None = None) -> ConfigDict:
  """Loads an experiment file, applies ``KEY=VALUE`` overrides, validates, and returns it locked.

  The mesh and batch sizes are checked against ``num_devices`` (default: the devices present;
  ``deepflow plan --topology`` passes the slice's)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConfigError(f"experiment file not found: {path}")
  spec = importlib.util.spec_from_file_location("deepflow_experiment", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # the file itself is broken: say where, in one line
    raise ConfigError(f"cannot load experiment {_line_of(e, path)}: {type(e).__name__}: "
                      f"{_first_line(e)}") from e
  if not hasattr(module, "get_config"):
    raise ConfigError(f"experiment {path} defines no get_config()")
  try:
    config = module.get_config()
  except Exception as e:  # the experiment's own code failed: name its line, not deepflow's
    raise ConfigError(f"get_config() in {_line_of(e, path)} raised {type(e).__name__}: "
                      f"{_first_line(e)}") from e
  if not isinstance(config, ConfigDict):
    raise ConfigError(f"get_config() in {path} must return an ml_collections.ConfigDict")
  return finalize(config, overrides, num_devices)


def _line_of(error: BaseException, path: str) -> str:
  """``PATH:LINE`` of the innermost frame of ``error`` inside the experiment file ``path``."""
  if isinstance(error, SyntaxError) and error.lineno:
    return f"{path}:{error.lineno}"
  frames = [f for f in traceback.extract_tb(error.__traceback__)
            if os.path.abspath(f.filename) == os.path.abspath(path)]
  return f"{path}:{frames[-1].lineno}" if frames else path


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return text[0] if text else ""


def finalize(config: ConfigDict, overrides: Iterable[str] = (),
             num_devices: int | None = None) -> ConfigDict:
  """Fills in defaults, locks, applies overrides and validates (used for files and for JSON)."""
  config = _with_defaults(config)
  config.lock()
  apply_overrides(config, overrides)
  config = _with_defaults(config)  # an override may have changed model.name or task.name
  config.lock()
  validate(config, num_devices)
  return config


def config_from_json(text: str, overrides: Iterable[str] = ()) -> ConfigDict:
  """Rebuilds a run's config from the ``config.json`` written into its workdir."""
  return finalize(ConfigDict(json.loads(text)), overrides)


def parse_value(text: str) -> Any:
  """A command-line value as Python: literals (numbers, tuples, lists, dicts), booleans in either
  case, ``none``; anything else stays a string."""
  lowered = text.strip().lower()
  if lowered in ("true", "false"):
    return lowered == "true"
  if lowered in ("none", "null"):
    return None
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config: ConfigDict, overrides: Iterable[str]) -> None:
  """Applies ``a.b.c=VALUE`` strings to a locked config; unknown keys and bad types are errors."""
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep or not key:
      raise ConfigError(f"override {item!r} is not KEY=VALUE")
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
      if not isinstance(node, ConfigDict) or part not in node:
        raise ConfigError(f"unknown config key {'.'.join(parents[:i + 1])!r} in override {item!r}")
      node = node[part]
    if not isinstance(node, ConfigDict) or leaf not in node:
      known = ", ".join(sorted(node.keys())) if isinstance(node, ConfigDict) else ""
      raise ConfigError(f"unknown config key {key!r}; known here: {known}")
    value = parse_value(raw)
    old = node[leaf]
    if isinstance(old, (list, tuple)) and isinstance(value, (list, tuple)):
      value = type(old)(value)
    try:
      with node.unlocked():
        node[leaf] = value
    except TypeError as e:
      raise ConfigError(f"bad type for {key}: {value!r} ({type(value).__name__}); "
                        f"expected {type(old).__name__}") from e


# ------------------------------------------------------------------------------------------------
# Defaults of the chosen model and task, then validation.
# ------------------------------------------------------------------------------------------------

def _with_defaults(config: ConfigDict) -> ConfigDict:
  """A copy of ``config`` with base keys, model fields and task options that it leaves out."""
  from deepflow import tasks  # noqa: F401  (fills TASKS)
  from deepflow.models import TRANSFER_KEYS, model_options  # fills MODELS
  from deepflow.registry import MODELS, TASKS
  merged = base_config()
  _merge(merged, config)
  _fill(merged.model, {k: v for k, v in base_config().model.items() if k in TRANSFER_KEYS})
  if str(merged.model.init_from).startswith("hf:"):  # the checkpoint's architecture
    from deepflow.hf import section
    section.fill_model_section(merged.model)
    section.fill_tokenizer(merged.data, merged.model)
  if merged.model.name in MODELS:
    for key, value in model_options(MODELS.get(merged.model.name)).items():
      if key not in merged.model:
        merged.model[key] = value
  if merged.task.name in TASKS:
    for key, value in TASKS.get(merged.task.name).OPTIONS.items():
      if key not in merged.task:
        merged.task[key] = value
  return merged


def _fill(section: ConfigDict, defaults: dict[str, Any]) -> None:
  """Adds the ``defaults`` that ``section`` lacks, inside nested sections too."""
  for key, value in defaults.items():
    if key not in section:
      section[key] = value
    elif isinstance(value, ConfigDict) and isinstance(section[key], ConfigDict):
      _fill(section[key], dict(value.items()))


def _merge(base: ConfigDict, update: ConfigDict) -> None:
  """Copies ``update`` into ``base``; sections whose keys are free-form (model, task) replace."""
  for key, value in update.items():
    if isinstance(value, ConfigDict) and key in base and isinstance(base[key], ConfigDict):
      if key in ("model", "task") and value.get("name") != base[key].get("name"):
        base[key] = ConfigDict(value.to_dict())
      else:
        _merge(base[key], value)
    else:
      try:
        base[key] = value.to_dict() if isinstance(value, ConfigDict) else value
      except TypeError as e:
        raise ConfigError(f"config key {key!r}: {value!r} has the wrong type "
                          f"(default is {base[key]!r})") from e


def validate(config: ConfigDict, num_devices: int | None = None) -> None:
  """Checks names, keys, types and values before anything is compiled."""
  from deepflow import data, optim, regularizers, tasks  # noqa: F401  (fill the registries)
  from deepflow.data import sources
  from deepflow.models import TRANSFER_KEYS, model_options  # fills MODELS
  from deepflow.registry import MODELS, TASKS, OPTIMIZERS, SCHEDULES, TRANSFORMS, REGULARIZERS
  from deepflow.weights import matching

  base = base_config()
  _check_keys(config, base, "")

  model_cls = MODELS.get(config.model.name)
  _check_keys(ConfigDict({k: config.model[k] for k in TRANSFER_KEYS}),
              ConfigDict({k: base.model[k] for k in TRANSFER_KEYS}), "model.")
  allowed = set(model_options(model_cls)) | set(TRANSFER_KEYS)
  for key in config.model:
    if key != "name" and key not in allowed:
      raise ConfigError(f"model {config.model.name!r} has no option {key!r}; "
                        f"options: {', '.join(sorted(allowed))}")
  task_cls = TASKS.get(config.task.name)
  allowed = set(task_cls.OPTIONS)
  for key in config.task:
    if key != "name" and key not in allowed:
      raise ConfigError(f"task {config.task.name!r} has no option {key!r}; "
                        f"options: {', '.join(sorted(allowed)) or 'none'}")
  matching.check_config(config.model)
  OPTIMIZERS.get(config.optimizer.name)
  SCHEDULES.get(config.optimizer.schedule)
  for entry in config.data.transforms:
    TRANSFORMS.get(_entry_name(entry, "data.transforms"))
  for entry in config.regularizers:
    REGULARIZERS.get(_entry_name(entry, "regularizers"))
  sources.parse_source(config.data.source)

  _positive_int(config, "data.batch_size", "data.eval_batch_size", "train.steps",
                "train.log_every", "train.keep_checkpoints", "train.microbatches",
                "train.max_nonfinite")
  for key in ("train.eval_every", "train.checkpoint_every", "optimizer.warmup_steps",
              "optimizer.decay_steps"):
    if _get(config, key) < 0:
      raise ConfigError(f"{key} must be >= 0, got {_get(config, key)}")
  if not config.optimizer.learning_rate > 0:
    raise ConfigError(f"optimizer.learning_rate must be > 0, got {config.optimizer.learning_rate}")
  if config.train.compute_dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"train.compute_dtype must be 'float32' or 'bfloat16', got "
                      f"{config.train.compute_dtype!r}")
  if config.parallel.strategy not in ("data", "fsdp"):
    raise ConfigError(f"parallel.strategy must be 'data' or 'fsdp', got "
                      f"{config.parallel.strategy!r}")
  for rule in config.parallel.rules:
    if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ConfigError(f"each parallel.rules entry must be (regex, spec tuple), got {rule!r}")
  profile = tuple(config.train.profile_steps)
  if profile and (len(profile) != 2 or not 0 <= profile[0] < profile[1]):
    raise ConfigError(f"train.profile_steps must be (first, last) with 0 <= first < last, "
                      f"got {profile}")
  if config.data.cache not in (True, False, "auto"):
    raise ConfigError(f"data.cache must be True, False or 'auto', got {config.data.cache!r}")
  if not config.data.cache_budget_gb >= 0:
    raise ConfigError(f"data.cache_budget_gb must be >= 0, got {config.data.cache_budget_gb}")
  _positive_int(config, "data.stats_examples")
  if not (isinstance(config.data.workers, int) and config.data.workers >= 0):
    raise ConfigError(f"data.workers must be an int >= 0, got {config.data.workers!r}")
  if config.train.nonfinite not in ("stop", "skip"):
    raise ConfigError(f"train.nonfinite must be 'stop' or 'skip', got {config.train.nonfinite!r}")
  if config.data.batch_size % config.train.microbatches:
    raise ConfigError(f"data.batch_size={config.data.batch_size} is not divisible by "
                      f"train.microbatches={config.train.microbatches}")

  if config.data.tokenizer:
    _validate_text(config)
  if config.privacy.enabled:
    from deepflow import privacy  # dp-accounting loads only for private runs
    privacy.validate_config(config)

  from deepflow import parallel
  data_size = parallel.data_axis_size(config.mesh, num_devices)
  for key in ("data.batch_size", "data.eval_batch_size"):
    per_step = _get(config, key) // (config.train.microbatches if key == "data.batch_size" else 1)
    if per_step % data_size:
      raise ConfigError(f"{key}={_get(config, key)} (per micro-batch {per_step}) is not divisible "
                        f"by the {data_size} devices on the mesh's data axis")


def _validate_text(config: ConfigDict) -> None:
  """A tokenized, packed text dataset (``data.tokenizer``): what it needs from the rest."""
  from deepflow.data import tokenizers
  tokenizers.parse(config.data.tokenizer)
  if not config.data.source.startswith(("tfds:", "bundled:")):
    raise ConfigError(f"data.tokenizer={config.data.tokenizer!r} reads a TFDS or bundled text "
                      f"dataset (data.source='tfds:NAME' or 'bundled:text/documents'), got "
                      f"{config.data.source!r}")
  if config.task.name not in ("language_model", "distillation"):  # the latter: an LM student
    raise ConfigError(f"data.tokenizer gives packed token rows for task 'language_model' (or "
                      f"its 'distillation'), not {config.task.name!r}")
  _positive_int(config, "data.seq_len")
  if config.privacy.enabled:  # a packed row mixes documents: no per-example unit to clip
    raise ConfigError("privacy.enabled is not supported with data.tokenizer: a packed row "
                      "mixes several documents, so DP-SGD's unit of privacy would be wrong")


def _entry_name(entry: Any, where: str) -> str:
  if not isinstance(entry, (dict, ConfigDict)) or "name" not in entry:
    raise ConfigError(f"each entry of {where} must be a dict with a 'name', got {entry!r}")
  return entry["name"]


def _check_keys(config: ConfigDict, base: ConfigDict, prefix: str) -> None:
  for key, value in config.items():
    path = f"{prefix}{key}"
    if key not in base:
      raise ConfigError(f"unknown config key {path!r}; known: {', '.join(sorted(base.keys()))}")
    if isinstance(base[key], ConfigDict) and path not in FREE_FORM_SECTIONS:
      if not isinstance(value, ConfigDict):
        raise ConfigError(f"config key {path!r} must be a section, got {value!r}")
      _check_keys(value, base[key], path + ".")
    elif not isinstance(base[key], ConfigDict) and path not in ANY_TYPE_KEYS:
      _check_type(path, value, base[key])


def _check_type(path: str, value: Any, default: Any) -> None:
  kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,),
           tuple: (tuple, list), list: (list, tuple)}
  expected = kinds.get(type(default))
  ok = expected is None or (isinstance(value, expected) and
                            not (isinstance(value, bool) and bool not in expected))
  if not ok:
    raise ConfigError(f"config key {path!r} must be {type(default).__name__}, "
                      f"got {value!r} ({type(value).__name__})")


def _get(config: ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _positive_int(config: ConfigDict, *keys: str) -> None:
  for key in keys:
    value = _get(config, key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ConfigError(f"{key} must be a positive integer, got {value!r}")


def to_json(config: ConfigDict) -> str:
  """The resolved config as the ``config.json`` a workdir keeps."""
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
