"""Named variants: override sets (an ablation, a ladder) trained side by side, each in its own
sub-workdir, the table of their means over seeds, and ``compare``, the one comparison script
behind ``python experiments/NAME.py`` (an experiment file only declares its variants)."""
from __future__ import annotations

import argparse
import os
from typing import Callable, Sequence, Union

from ml_collections import ConfigDict

from deepflow.sweep.space import trial_config


def seeded_variants(variants: dict[str, Sequence[str]], seeds: int,
                    overrides: Sequence[str] = ()) -> dict[str, list[str]]:
  """Each named override set once per seed (``NAME/seedS``), with ``overrides`` for every run:
  the runs behind a table of means over seeds."""
  return {f"{name}/seed{s}": [*v, f"seed={s}", *overrides]
          for name, v in variants.items() for s in range(seeds)}


def seed_means_table(results: dict, names: Sequence[str], seeds: int | None, keys: Sequence[str],
                     *, first_column: str, split: str = "test") -> str:
  """A Markdown table: one row per variant, the mean over seeds of each metric in ``keys``
  (``results`` as ``run_variants`` returns them for ``seeded_variants``; ``seeds=None``: one run
  per variant, under its own name). A metric a variant does not report shows as '-'."""
  runs_of = {name: [results[name][split]] if seeds is None else
             [results[f"{name}/seed{s}"][split] for s in range(seeds)] for name in names}
  what = "one run" if seeds is None else f"mean of {seeds} seeds"
  lines = [f"| {first_column} | {' | '.join(keys)} |  ({split} split, {what})",
           "|---|" + "---|" * len(keys)]
  for name, runs in runs_of.items():
    cells = [f"{sum(r[k] for r in runs) / len(runs):.4f}" if all(k in r for r in runs) else "-"
             for k in keys]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
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


# A variant: its overrides, or a function of the experiment's config that computes them (e.g.
# from statistics of the train split).
Variant = Union[Sequence[str], Callable[[ConfigDict], Sequence[str]]]


def compare(path: str, variants: dict[str, Variant], argv: Sequence[str] | None = None, *,
            description: str, workdir: str, keys: Sequence[str] = (),
            first_column: str = "variant", seeds: int | None = 3,
            splits: Sequence[str] = ()) -> dict[str, dict[str, dict[str, float]]]:
  """``python experiments/NAME.py [--workdir DIR] [--seeds N] [KEY=VALUE ...]``: trains every
  variant of the experiment file ``path`` (once per seed, resumable: ``run_variants``), prints the
  table of ``keys`` (``seed_means_table``) when given, and returns the results. The overrides
  apply to every run; ``seeds=None`` runs each variant once, under its own name."""
  from deepflow import config as config_lib
  path = os.path.abspath(path)
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--workdir", default=workdir)
  if seeds is not None:
    parser.add_argument("--seeds", type=int, default=seeds, help="runs per variant (averaged)")
  parser.add_argument("overrides", nargs="*", help="KEY=VALUE for every run (e.g. train.steps=50)")
  args = parser.parse_args(argv)
  resolved = {name: list(v(config_lib.load_config(path, args.overrides)) if callable(v) else v)
              for name, v in variants.items()}
  runs = ({name: [*v, *args.overrides] for name, v in resolved.items()} if seeds is None else
          seeded_variants(resolved, args.seeds, args.overrides))
  results = run_variants(path, args.workdir, runs, splits=splits)
  if keys:
    print(seed_means_table(results, list(variants), None if seeds is None else args.seeds, keys,
                           first_column=first_column))
  return results
