"""`deepflow plan --remat_policies`: the train step compiled under each remat policy, whose
memory must order as rematerialization implies, each the figure of an experiment built for that
policy alone."""
import copy

import jax

from deepflow import plan as plan_lib
from deepflow.train.experiment import Experiment
from tests.helpers import tiny_config


def test_remat_policies_order_the_memory_of_a_scanned_transformer():
  """Activations dominate (a ViT of 65 tokens, narrow, batch 256 on one device): recomputing
  everything ('full', 'nothing_saveable') keeps least, saving matmul outputs ('dots_saveable')
  more, no rematerialization ('none') most."""
  model = dict(name="vit", patch_size=1, d_model=32, num_heads=4, num_layers=2, mlp_dim=64,
               scan_layers=True, remat_policy="dots_saveable")
  config = tiny_config("data.batch_size=256", model=model, num_devices=1)
  exp = Experiment(config, None, devices=jax.devices()[:1])
  rows = {r["policy"]: r for r in plan_lib.remat_table(exp)}
  temporaries = {policy: row["temporaries"] for policy, row in rows.items()}
  assert temporaries["full"] <= temporaries["dots_saveable"] < temporaries["none"]
  assert temporaries["nothing_saveable"] <= temporaries["dots_saveable"]
  assert temporaries["full"] < 0.6 * temporaries["none"]
  lines = plan_lib.format_remat(list(rows.values()), "dots_saveable")
  assert "dots_saveable (this config)" in lines[3] and "saves 0.000 GiB" in lines[1]

  # One experiment serves every policy (only the task is rebuilt): each policy's train step is
  # the program an experiment built for that policy compiles, so its figures are that one's.
  args = (plan_lib.abstract_args(exp), exp.pipeline.abstract_batch(256, train=True))
  for policy in plan_lib.REMAT_COMPARED:
    variant = copy.deepcopy(config)
    variant.model.remat_policy = policy
    alone = Experiment(variant, None, devices=jax.devices()[:1])
    assert (plan_lib._train_step_with(exp, policy).lower(*args).as_text()
            == alone.train_step.lower(*args).as_text()), policy
  last = plan_lib.compile_cost(alone.train_step, *args)  # the last policy's, built alone
  assert (last.temporaries, last.peak) == (rows[policy]["temporaries"], rows[policy]["peak"])
