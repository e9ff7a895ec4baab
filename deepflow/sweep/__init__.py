"""Hyperparameter sweeps: grid or random search over config keys, one trial after another or as one
vmapped population.

``deepflow sweep --config FILE --workdir DIR --sweep optimizer.learning_rate=1e-4,1e-3,1e-2
--sweep model.dropout=0,0.1 [--trials N] [--vectorize]``

Each trial is a config override set with its own sub-workdir (``DIR/trial_000``, ...) holding
``trial.json`` (its overrides) and, once finished, ``result.json`` (its final eval metrics).
Sequential trials are ordinary runs, so an interrupted sweep resumes its unfinished trial and
skips finished ones. ``--vectorize`` trains all trials in one compiled program: the train step is
``jax.vmap``-ed over a population axis of TrainStates whose swept hyperparameters (learning rate,
weight decay, Adam's betas, dropout rate, seed) are traced values, so trial ``i`` computes what
the same config trained alone would. At the end the sweep writes ``results.csv``, a ranked
``results.md`` and a plot of the chosen metric (``results.png``).

``--search tpe|cmaes|gp``, ``--prune median|asha|hyperband`` or ``--study NAME --storage URL``
run the sweep as an Optuna study (``run_study``): trials learned from the ones before, pruned on
their evaluations, pulled by any number of workers from one SQLite or PostgreSQL storage.
"""
from deepflow.sweep.population import VECTORIZABLE, Population, traced_dropout, train_population  # noqa: F401,E501
from deepflow.sweep.results import (MAXIMIZE, RESULT, default_metric, plot,  # noqa: F401
                                    ranked_table, write_results)
from deepflow.sweep.search import TRIAL, run_sweep  # noqa: F401
from deepflow.sweep.space import Axis, make_trials, overrides_of, parse_axis, trial_config  # noqa: F401,E501
from deepflow.sweep.distributions import Param, parse_param  # noqa: F401
from deepflow.sweep.study import STUDY  # noqa: F401
from deepflow.sweep.worker import (needs_study, run_study, study_summary,  # noqa: F401
                                   worker_seed)
from deepflow.sweep.variants import compare, run_variants, seed_means_table, seeded_variants  # noqa: F401,E501
