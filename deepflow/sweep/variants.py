"""Named variants: override sets (an ablation, a ladder) trained side by side, each in its own
sub-workdir, and the table of their means over seeds."""
from __future__ import annotations

import os
from typing import Sequence

from ml_collections import ConfigDict

from deepflow.sweep.space import trial_config


def seeded_variants(variants: dict[str, Sequence[str]], seeds: int,
                    overrides: Sequence[str] = ()) -> dict[str, list[str]]:
  """Each named override set once per seed (``NAME/seedS``), with ``overrides`` for every run:
  the runs behind a table of means over seeds."""
  return {f"{name}/seed{s}": [*v, f"seed={s}", *overrides]
          for name, v in variants.items() for s in range(seeds)}


def seed_means_table(results: dict, names: Sequence[str], seeds: int, keys: Sequence[str], *,
                     first_column: str, split: str = "test") -> str:
  """A Markdown table: one row per variant, the mean over seeds of each metric in ``keys``
  (``results`` as ``run_variants`` returns them for ``seeded_variants``)."""
  lines = [f"| {first_column} | {' | '.join(keys)} |  ({split} split, mean of {seeds} seeds)",
           "|---|" + "---|" * len(keys)]
  for name in names:
    runs = [results[f"{name}/seed{s}"][split] for s in range(seeds)]
    lines.append(f"| {name} | " + " | ".join(f"{sum(r[k] for r in runs) / len(runs):.4f}"
                                            for k in keys) + " |")
  return "\n".join(lines)


def run_variants(base: str | ConfigDict, workdir: str, variants: dict[str, Sequence[str]], *,
                 splits: Sequence[str] = ()) -> dict[str, dict[str, dict[str, float]]]:
  """Named override sets (an ablation or a ladder), each trained in ``workdir/NAME`` (resumable:
  a finished one is only evaluated). Returns, per variant, the final metrics of its eval split
  and of each extra split in ``splits`` (e.g. 'train', to measure the train/eval gap),
  evaluated on the state the run returns (the best one under early stopping)."""
  import deepflow
  from deepflow.train.experiment import Experiment
  results = {}
  for name, overrides in variants.items():
    config = trial_config(base, overrides)
    run = os.path.join(workdir, name)
    results[name] = {config.data.eval_split: deepflow.train_and_evaluate(config, run)}
    if splits:
      exp, state, _, _ = Experiment.from_workdir(run)  # the run's result, as returned above
      for split in splits:
        results[name][split] = exp.evaluate(state, split)
  return results
