"""Vectorized sweeps: configs that differ only in numeric hyperparameters, trained as one vmapped
population in one compiled program, with the training loop's own metric window (the non-finite
policy included), writers and config file."""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import types
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from deepflow.registry import ConfigError
from deepflow.sweep.space import trial_config

# Keys that change no shape or Python branch, so one compiled program serves every value.
VECTORIZABLE = ("seed", "model.dropout", "optimizer.learning_rate", "optimizer.weight_decay",
                "optimizer.end_learning_rate", "optimizer.b1", "optimizer.b2", "optimizer.eps")
ACTIVE = "active"  # in ``Population.hyper`` once members may stop: 1 trains on, 0 keeps the state
_SWEPT_DROPOUT = 0.123456789  # marks the Dropout layers whose rate is the traced swept value


@contextlib.contextmanager
def traced_dropout(rate: jax.Array | None):
  """Inside the block, every ``nn.Dropout`` built with rate ``_SWEPT_DROPOUT`` drops with the
  traced ``rate`` instead. Written here because Linen's Dropout branches on its rate in Python
  (so it cannot be traced); the mask is drawn exactly as Linen draws it (same key, bernoulli of
  the keep probability), so a population member equals its trial trained alone."""
  if rate is None:
    yield
    return

  def interceptor(next_fn, args, kwargs, context):
    module = context.module
    if (not isinstance(module, nn.Dropout) or context.method_name != "__call__"
        or module.rate != _SWEPT_DROPOUT):
      return next_fn(*args, **kwargs)
    inputs = args[0]
    deterministic = nn.merge_param("deterministic", module.deterministic,
                                   args[1] if len(args) > 1 else kwargs.get("deterministic"))
    if deterministic:
      return inputs
    rng = kwargs.get("rng")
    if rng is None:
      rng = module.make_rng(module.rng_collection)
    keep = 1.0 - rate  # float32, as Linen's Python float becomes: the same uniform draws
    shape = [1 if d in module.broadcast_dims else n for d, n in enumerate(inputs.shape)]
    mask = jnp.broadcast_to(jax.random.bernoulli(rng, p=keep, shape=shape), inputs.shape)
    return jax.lax.select(mask, inputs / keep.astype(inputs.dtype), jnp.zeros_like(inputs))

  with nn.intercept_methods(interceptor):
    yield


class Population:
  """Configs that differ only in ``VECTORIZABLE`` keys, as one vmapped program: ``init()`` gives
  the stacked TrainState (leading axis = member), ``train_step(state, batch, hyper)`` and
  ``eval_step(state, batch)`` are jitted over the whole population.

  ``keys``: keys the caller varies from one population to the next (a study's parameters), swept
  even where this population's members agree, so that every round of a study is the same
  program. The program (task, jitted steps, data pipelines) is kept for the next population
  that needs it (``_program``): a study's later rounds neither retrace nor rebuild their data."""

  def __init__(self, configs: Sequence[ConfigDict], keys: Sequence[str] = ()):
    self.configs = list(configs)
    base = self.base = self.configs[0]
    differing = _differing_keys(self.configs)
    fixed = [k for k in differing if k not in VECTORIZABLE]
    if fixed:
      raise ConfigError(f"--vectorize cannot sweep {', '.join(fixed)} (it changes shapes or the "
                        f"program); vectorizable: {', '.join(VECTORIZABLE)}")
    if jax.process_count() > 1:
      raise ConfigError("--vectorize runs on one host; sweep sequentially on several")
    if any(e["name"] == "early_stopping" for e in base.regularizers):
      raise ConfigError("--vectorize does not support early_stopping; sweep sequentially")
    if base.train.autotune:
      raise ConfigError("--vectorize does not support train.autotune (it times one run's step); "
                        "set train.xla_options instead")
    transfer = [k for k, on in (("model.init_from", base.model.init_from),
                                ("model.lora", base.model.lora.rank),
                                ("optimizer.freeze", base.optimizer.freeze),
                                ("optimizer.lr_multipliers", base.optimizer.lr_multipliers))
                if on]
    if transfer:
      raise ConfigError(f"--vectorize does not support {', '.join(transfer)}; sweep sequentially")

    swept = sorted({*differing, *(k for k in keys if k in VECTORIZABLE)})
    self.seeds = [int(c.seed) for c in self.configs]
    self.per_member_data = len(set(self.seeds)) > 1
    self.program = program = _program(base, swept, self.per_member_data)
    self.update, self.train_step, self.eval_step = (program.update, program.train_step,
                                                    program.eval_step)
    # Data: one pipeline per distinct seed (the seed orders the batches, and may make the data).
    self.pipelines = {s: program.pipeline(s) for s in dict.fromkeys(self.seeds)}
    self.hyper = {k: jnp.asarray([float(_get(c, k)) for c in self.configs], jnp.float32)
                  for k in swept if k != "seed"}

  def init(self):
    """The members' stacked TrainState: each member's made by one program of one member (the
    same values as a vmapped init; measured cold, it compiled in 4.6 s where the vmapped one
    took 8.0 s), then stacked."""
    members = [self.program.init(jnp.int32(seed), {k: v[i] for k, v in self.hyper.items()})
               for i, seed in enumerate(self.seeds)]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *members)

  def batch(self, batches: dict[int, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One batch for all members, or each member's from its seed's pipeline (seed swept)."""
    if not self.per_member_data:
      return batches[self.seeds[0]]
    return {k: np.stack([batches[s][k] for s in self.seeds]) for k in batches[self.seeds[0]]}

  def evaluate(self, state, step: int) -> list[dict[str, float]]:
    """Each member's metrics over the whole eval split, as ``Experiment.evaluate`` gives a
    run's (the task's summaries and the update's ``extra_metrics`` at ``step``)."""
    from deepflow.train.experiment import summarize_split
    split = self.base.data.eval_split
    outputs = [jax.device_get(self.eval_step(state, self.batch(dict(zip(self.pipelines, b)))))
               for b in zip(*(p.eval_batches(split) for p in self.pipelines.values()))]
    return [summarize_split(self.update, ({k: v[i] for k, v in out.items()} for out in outputs),
                            step) for i in range(len(self.configs))]


class _Program:
  """What a population compiles and reads, built from its first config (``base``) with the
  ``swept`` keys traced: the task (swept dropout layers marked), the update, the jitted init of
  one member, train and eval steps over the member axis, and the data pipeline of each seed."""

  def __init__(self, base: ConfigDict, swept: Sequence[str], per_member_data: bool):
    from deepflow.train import runtime, tuning
    from deepflow.train.experiment import build_task
    from deepflow.train.step import make_eval_step, make_train_step
    from deepflow.train.update import build_update
    self.base, self.pipelines = base, {}
    spec = self.pipeline(int(base.seed)).spec
    overrides = [f"model.dropout={_SWEPT_DROPOUT}"] if "model.dropout" in swept else []
    task = build_task(trial_config(base, overrides), spec)
    if task.learning_rates() is not None:
      raise ConfigError(f"--vectorize does not support task {base.task.name!r} (own optimizer)")
    self.update = build_update(base, task, base.train.steps)

    def member_step(state, batch, hp):
      with traced_dropout(hp.get("model.dropout")):
        update = dataclasses.replace(self.update, tx=self.optimizer(hp))
        new, metrics = make_train_step(update)(state, batch)
      if ACTIVE in hp:  # a stopped (pruned) member keeps its state
        new = jax.tree.map(lambda n, o: jnp.where(hp[ACTIVE], n, o), new, state)
      return new, metrics

    def member_init(seed, hp):
      from deepflow.train.state import create_state
      return create_state(self.update, self.optimizer(hp), seed)

    batch_axis = 0 if per_member_data else None
    runtime.use_compilation_cache(base.train.compilation_cache)  # as a run does: rounds reuse it
    options = tuning.step_options(base.train.xla_options, jax.default_backend()) or None
    self.init = jax.jit(member_init)
    self.train_step = jax.jit(jax.vmap(member_step, in_axes=(0, batch_axis, 0)),
                              donate_argnums=0, compiler_options=options)
    self.eval_step = jax.jit(jax.vmap(make_eval_step(self.update), in_axes=(0, batch_axis)),
                             compiler_options=options)

  def pipeline(self, seed: int):
    """The data pipeline of ``seed`` (built once: its iterators and eval batches start afresh
    on every call)."""
    from deepflow.data.text import make_pipeline
    if seed not in self.pipelines:
      self.pipelines[seed] = make_pipeline(trial_config(self.base, [f"seed={seed}"]),
                                           progress=bool(self.base.train.progress))
    return self.pipelines[seed]

  def optimizer(self, hp: dict[str, jax.Array]):
    """The configured optax chain with the swept optimizer options taken from ``hp``."""
    from deepflow.train.update import optimizer
    options = self.base.optimizer.to_dict()
    options.update({k.split(".", 1)[1]: v for k, v in hp.items() if k.startswith("optimizer.")})
    return optimizer(types.SimpleNamespace(**options), self.base.train.steps,
                     self.update.regularizer)


_LAST: dict[str, _Program] = {}  # the last program built, by ``_program``'s key


def _program(base: ConfigDict, swept: Sequence[str], per_member_data: bool) -> _Program:
  """The program of a population whose first config is ``base``: the last one built when it was
  built from the same config outside the swept keys (the first seed included), else a new one.
  One is kept, so a finished sweep's pipelines do not stay in memory beside the next one's."""
  key = json.dumps([{k: v for k, v in _flatten(base.to_dict()).items()
                     if k not in swept or k == "seed"}, list(swept), per_member_data],
                   sort_keys=True)
  if key not in _LAST:
    _LAST.clear()
    _LAST[key] = _Program(base, swept, per_member_data)
  return _LAST[key]


def train_population(configs: Sequence[ConfigDict], workdirs: Sequence[str],
                     on_eval: Callable[[int, dict[int, dict[str, float]]], set[int]] | None = None,
                     keys: Sequence[str] = ()) -> tuple[Any, list[dict[str, Any]]]:
  """Trains every config as one member of a vmapped ``Population`` by the loop of several runs
  in one program (``train.periodic.train_members``): each member's ``config.json``
  (``write_config``), ``metrics.jsonl`` (``MetricWriter``) and log windows under the loop's
  non-finite policy. No checkpoints: a population is rerun whole. Returns the stacked final
  TrainState and each member's result, as a sequential trial records it: ``{"status": "ok",
  "metrics": final eval metrics}``, or a failed status for a member that broke the non-finite
  policy (the others train on).

  ``on_eval(step, {member: eval metrics})`` sees each periodic evaluation of the members still
  training and returns those to stop there (a sweep's pruner): a stopped member's state stops
  updating, its metrics end at that step and its result is ``{"status": "pruned at step N",
  "metrics": that evaluation}``. Training ends early once every member has stopped or failed.
  ``keys``: as ``Population``'s (a study's parameters, so its rounds share one program)."""
  from deepflow.train.loop import write_config
  from deepflow.train.periodic import train_members
  from deepflow.train.writers import MetricWriter
  population = Population(configs, keys)
  for c, d in zip(configs, workdirs):
    write_config(c, d)
  writers = [MetricWriter(d) for d in workdirs]
  prune = None
  if on_eval is not None:
    population.hyper[ACTIVE] = jnp.ones(len(configs), jnp.bool_)
    pruned: set[int] = set()

    def prune(step: int, live: dict[int, dict[str, float]]) -> set[int]:
      stop = set(on_eval(step, live))
      pruned.update(stop)
      population.hyper[ACTIVE] = jnp.asarray([i not in pruned for i in range(len(configs))])
      return stop
  iterators = {s: p.train_iterator() for s, p in population.pipelines.items()}
  batches = (population.batch({s: next(it) for s, it in iterators.items()})
             for _ in itertools.count())
  try:
    state, failed, stopped, final = train_members(
        population.init(), lambda s, b: population.train_step(s, b, population.hyper), batches,
        population.evaluate, writers, population.base.train, population.base.data.eval_split,
        on_eval=prune)
  finally:
    for writer in writers:
      writer.close()
  return state, [{"status": failed[i], "metrics": {}} if i in failed else
                 {"status": f"pruned at step {stopped[i][0]}", "metrics": stopped[i][1]}
                 if i in stopped else {"status": "ok", "metrics": m}
                 for i, m in enumerate(final)]


def _get(config: ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _differing_keys(configs: Sequence[ConfigDict]) -> list[str]:
  """Dotted keys whose values differ between the configs."""
  flat = [_flatten(c.to_dict()) for c in configs]
  return sorted(k for k in flat[0] if any(f.get(k) != flat[0][k] for f in flat[1:]))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = json.dumps(value, sort_keys=True, default=str)
  return out
