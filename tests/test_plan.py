"""`deepflow plan`: compiled memory, FLOPs and sharding for TPU topologies (libtpu, no TPU) and
the local devices, checked against parameter counts, FLOP formulas and a real run."""
import dataclasses
import json

import pytest

from deepflow import config as config_lib, plan as plan_lib
from deepflow.registry import ConfigError
from tests.helpers import (deepflow_cli as deepflow, experiment_text, tiny_config,
                           write_experiment)

pytest.importorskip("libtpu", reason="needs the deepflow[tpu] extra")

# Digits-shaped inputs (8x8x1 = 64 features) and 10 classes.
BIG = (40_000, 40_000)  # 1.6e9 parameters: 19 GB of parameters and Adam moments


def mlp_parameters(hidden, inputs=64, classes=10):
  sizes = (inputs, *hidden, classes)
  return sum(a * b + b for a, b in zip(sizes, sizes[1:]))


def plan(hidden, *overrides, topology="v5e:2x2", search_batch=False):
  config = tiny_config(*overrides, model=dict(name="mlp", hidden=hidden),
                       num_devices=len(plan_lib.target_devices(topology)))
  return plan_lib.make_plan(config, topology, search_batch=search_batch)


def test_small_model_fits_with_its_state_and_flops_counted():
  hidden = (256, 128)
  result = plan(hidden)
  n = mlp_parameters(hidden)
  assert result["devices"]["count"] == 4 and result["devices"]["kind"] == "TPU v5 lite"
  assert result["parameters"] == n
  state = result["state_bytes"]
  assert state["params"] == 4 * n                       # float32, replicated (data parallel)
  assert 0 <= state["opt_state"] - 2 * 4 * n <= 16       # Adam's two moments and step counters
  assert result["train_step"]["arguments"] >= state["params"] + state["opt_state"]
  assert result["fits"] and result["free_bytes"] == 16 * 2 ** 30 - result["peak_bytes"]
  # Forward + backward of the dense layers: 6 FLOPs per weight per example, 8 rows per device.
  dense = 6 * (32 // 4) * sum(a * b for a, b in zip((64, *hidden), (*hidden, 10)))
  assert dense <= result["train_step"]["flops"] < 1.5 * dense
  roofline = result["roofline"]
  assert roofline["step_seconds"] == pytest.approx(max(
      result["train_step"]["flops"] / 197e12, result["train_step"]["bytes_accessed"] / 819e9))
  assert all(p["spec"] == str((None,) * len(p["shape"])) for p in result["sharding"])
  text = plan_lib.format_plan(result)
  assert "fits, " in text and "GiB free per device" in text and "Dense_1/kernel" in text


def test_big_model_does_not_fit_until_fsdp_shards_it():
  data_parallel = plan(BIG)
  assert not data_parallel["fits"]
  assert data_parallel["state_bytes"]["params"] == 4 * mlp_parameters(BIG)
  fsdp = plan(BIG, "parallel.strategy=fsdp")
  assert fsdp["fits"], fsdp["peak_bytes"] / 2 ** 30
  kernels = {p["name"]: p for p in fsdp["sharding"] if p["name"].endswith("kernel")}
  middle = kernels["Dense_1/kernel"]
  assert "'data'" in middle["spec"] and middle["bytes"] == 4 * BIG[0] * BIG[1] // 4
  assert fsdp["state_bytes"]["params"] < data_parallel["state_bytes"]["params"] / 3


def test_another_topology_with_a_model_axis():
  result = plan((256, 128), "mesh.shape={'data': 4, 'model': 2}", topology="v4:2x2x1")
  assert result["devices"]["count"] == 8 and result["devices"]["mesh"] == {"data": 4, "model": 2}
  assert result["devices"]["hbm_bytes"] == 16 * 2 ** 30
  kernel = next(p for p in result["sharding"] if p["name"] == "Dense_0/kernel")
  assert kernel["spec"] == "(None, 'model')" and kernel["bytes"] == 4 * 64 * 256 // 2


def test_scanned_and_accumulated_steps_count_every_layer_and_micro_batch(data_dir):
  """XLA's cost analysis counts a loop body once; the plan's FLOPs of a scanned, accumulating
  step are those of the same step without loops."""
  lm = dict(name="transformer_lm", d_model=16, num_heads=2, num_layers=2, mlp_dim=32,
            max_len=16)
  results = []
  for scan, micro in ((False, 1), (True, 2)):
    config = tiny_config(f"model.scan_layers={scan}", f"train.microbatches={micro}", model=lm,
                         num_devices=4, task__name="language_model", data__transforms=[],
                         data__data_dir=data_dir, data__source="bundled:text/seq_len=16",
                         data__batch_size=32, data__eval_batch_size=32)
    results.append(plan_lib.make_plan(config, "v5e:2x2", search_batch=False))
  unrolled, looped = results
  assert looped["costs_from"].startswith("its unrolled equivalent")
  assert looped["train_step"]["flops"] == pytest.approx(unrolled["train_step"]["flops"], rel=0.02)
  assert looped["state_bytes"] == unrolled["state_bytes"]


def test_largest_batch_is_the_boundary_found_by_compiling(monkeypatch):
  # A chip one byte too small for batch 64 by the compiler's own figures, so the boundary lies
  # below it and the search stays cheap (each try is a compile).
  hidden = (4096,)
  at_64 = plan(hidden, "data.batch_size=64")["train_step"]["peak"]
  chip = plan_lib.CHIPS["TPU v5 lite"]
  monkeypatch.setitem(plan_lib.CHIPS, "TPU v5 lite", dataclasses.replace(chip, hbm=at_64 - 1))
  result = plan(hidden, search_batch=True)
  largest = result["largest_batch"]
  assert 0 < largest < 64 and largest % 4 == 0 and not result["largest_batch_is_limit"]
  assert plan(hidden, f"data.batch_size={largest}")["fits"]
  assert not plan(hidden, f"data.batch_size={largest + 4}")["fits"]


def test_largest_fitting_bisects_to_the_unit():
  assert plan_lib.largest_fitting(lambda b: b <= 52, 4, 1000) == 52
  assert plan_lib.largest_fitting(lambda b: b <= 3, 4, 1000) == 0
  assert plan_lib.largest_fitting(lambda b: True, 4, 64) == 64
  assert plan_lib.largest_fitting(lambda b: b <= 100, 4, 60) == 60


def test_largest_fitting_from_a_guess_finds_the_same_batch_in_fewer_tries():
  """Against a brute-force scan, for thresholds and guesses below, at and above the answer."""
  for unit, limit in ((1, 1), (4, 60), (3, 1000)):
    for threshold in range(0, 1100, 13):
      expected = max((b for b in range(unit, limit + 1, unit) if b <= threshold), default=0)
      for guess in (None, 1, unit, 52, 400, 5000):
        assert plan_lib.largest_fitting(lambda b: b <= threshold, unit, limit, guess) == expected
  tries = []
  assert plan_lib.largest_fitting(lambda b: tries.append(b) or b <= 125, 1, 4096, 124) == 125
  assert len(tries) <= 4  # from 1 (no guess): 14 tries


def test_topology_without_libtpu_is_one_line(monkeypatch):
  monkeypatch.setattr(plan_lib.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ConfigError, match=r"pip install 'deepflow\[tpu\]'"):
    plan_lib.target_devices("v5e:2x2")


def test_unknown_topology_is_a_config_error():
  with pytest.raises(ConfigError, match="unknown TPU topology 'v5e:banana'"):
    plan_lib.target_devices("v5e:banana")


BIG_EXPERIMENT = experiment_text({"model": dict(name="mlp", hidden=BIG),
                                  "data.source": "synthetic:digits_like", "data.batch_size": 32})


def test_cli_exits_non_zero_when_it_does_not_fit(tmp_path):
  experiment = write_experiment(tmp_path / "big.py", BIG_EXPERIMENT)
  out = deepflow("plan", "--config", experiment, "--topology", "v5e:2x2", "--json",
                 "--nosearch_batch")
  assert out.returncode == 1, out.stderr
  result = json.loads(out.stdout)
  assert result["fits"] is False and result["free_bytes"] < 0
  assert "TPU_WORKER_HOSTNAMES" not in out.stderr  # libtpu's warnings are silenced
  assert "TPU_ACCELERATOR_TYPE" not in out.stderr


MEASURED_EXPERIMENT = experiment_text({
    "model": dict(name="mlp", hidden=(2048, 2048, 2048)), "data.source": "synthetic:digits_like",
    "data.batch_size": 64, "data.transforms": []})


def test_local_plan_measures_real_steps(tmp_path):
  """On one CPU device the predicted peak (XLA's buffer sizes) is close to what the process's
  resident memory grows by over real steps (the reference)."""
  experiment = write_experiment(tmp_path / "mlp.py", MEASURED_EXPERIMENT)
  out = deepflow("plan", "--config", experiment, "--measure", "3", "--json",
                 env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout)
  assert result["devices"]["platform"] == "cpu" and result["devices"]["count"] == 1
  assert result["fits"] is None and "largest_batch" not in result
  predicted, measured = result["train_step"]["peak"], result["measured"]["peak_bytes"]
  assert predicted > 3 * 4 * mlp_parameters((2048, 2048, 2048))
  assert measured == pytest.approx(predicted, rel=0.25), (measured, predicted)

