"""train.xla_options and train.autotune: the options reach the compiled steps, the candidates are
what they say, the fastest is kept and recorded, tuning does not change what is trained, and a
resumed run reuses the recorded choice."""
import json
import os
import re
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import deepflow
from deepflow.registry import ConfigError
from deepflow.train import tuning
from deepflow.train.experiment import Experiment
from tests.helpers import tiny_config
from tests.train.test_loop import final_params

CNN = dict(name="cnn", features=(8, 16), dense=(16,), dropout=0.0)


def ynn_ops(compiled_text: str) -> set[str]:
  """The kinds of op (convolution, dot, reduce) that XLA:CPU runs in YNNPACK fusions."""
  bodies = dict(re.findall(r"^(%?fused_computation[.\d]*) [^\n]*\{\n(.*?)^\}", compiled_text,
                           re.M | re.S))
  ops = set()
  for called in re.findall(r"ynn_fusion[.\d]* = .*calls=(%?fused_computation[.\d]*)",
                           compiled_text):
    ops.update(re.findall(r"= \S+ (convolution|dot|reduce)\(", bodies[called]))
  return ops


def test_candidates_are_xla_default_with_and_without_convolutions():
  """XLA:CPU's default list is spelled out in the candidates: 'ynnpack' must be exactly XLA's
  default, 'eigen' (deepflow's CPU default) must move convolutions (forward, input and kernel
  gradients) off YNNPACK and keep every other default YNNPACK fusion."""
  x, w = jnp.ones((256, 8, 8, 32)), jnp.ones((3, 3, 32, 32))  # large enough for YNNPACK

  def program(x, w):
    conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y, vjp = jax.vjp(conv, x, w)
    flat = y.reshape(256, -1)
    return vjp(y), jnp.max(y, axis=(1, 2)), flat @ flat.T
  lowered = jax.jit(program).lower(x, w)
  default = ynn_ops(lowered.compile().as_text())  # XLA's own default list
  ynnpack, eigen = (ynn_ops(lowered.compile(compiler_options=tuning.CPU_CANDIDATES[name]
                                            ).as_text())
                    for name in ("ynnpack_convolutions", "eigen_convolutions"))
  assert "convolution" in default  # else the candidates have nothing to change
  assert ynnpack == default
  assert eigen == default - {"convolution"}
  assert tuning.PLATFORM_DEFAULTS["cpu"] == tuning.CPU_CANDIDATES["eigen_convolutions"]


def test_xla_options_reach_the_train_step():
  """On CPU the steps compile with Eigen's convolutions by default; train.xla_options over the
  defaults gives YNNPACK's back."""
  ynnpack = tuning.CPU_CANDIDATES["ynnpack_convolutions"]
  overrides = ["data.batch_size=256"]  # large enough for YNNPACK to take the convolutions
  default, tuned = (
      Experiment(tiny_config(*overrides, *extra, model=CNN, num_devices=1), None,
                 devices=jax.devices()[:1])
      for extra in ([], [f"train.xla_options={ynnpack!r}"]))
  state = default.init_state()
  batch = next(default.pipeline.train_iterator())
  texts = [exp.train_step.lower(state, batch).compile().as_text() for exp in (default, tuned)]
  assert default.compiler_options == tuning.CPU_CANDIDATES["eigen_convolutions"]
  assert "convolution" not in ynn_ops(texts[0]) and "dot" in ynn_ops(texts[0])
  assert tuned.compiler_options == ynnpack
  assert "convolution" in ynn_ops(texts[1])


@pytest.mark.parametrize("options, message", [
    ({"no_such_option": 1}, "No such compile option: 'no_such_option'"),
    ({tuning.YNN_FUSIONS: "CONVOLUTIONS_PLEASE"}, "not a valid enum value"),
    ({tuning.YNN_FUSIONS: ["a"]}, "must be a string, bool or number"),
])
def test_bad_xla_options_are_one_line_errors(options, message):
  with pytest.raises(ConfigError, match=re.escape(message)) as error:
    tuning.check_options(options)
  assert "\n" not in str(error.value) and str(error.value).startswith("train.xla_options")


def test_options_for_another_platform_are_left_to_its_compiler():
  """``deepflow plan --topology`` of a TPU slice on a CPU host: a TPU option is not refused."""
  assert tuning.check_options({"xla_tpu_no_such_flag": True}, "tpu") == {
      "xla_tpu_no_such_flag": True}
  with pytest.raises(ConfigError):
    tuning.check_options({"xla_tpu_no_such_flag": True}, "cpu")


def test_xla_options_override_from_the_command_line():
  config = tiny_config(f'train.xla_options={{"{tuning.YNN_FUSIONS}": '
                       f'"LIBRARY_FUSION_TYPE_REDUCE"}}')
  assert Experiment(config, None).compiler_options == {
      tuning.YNN_FUSIONS: "LIBRARY_FUSION_TYPE_REDUCE"}


def test_measure_times_each_step_from_a_fresh_state():
  def sleeper(name, seconds):
    def step(state, batch):
      assert state in ("fresh", name)  # a round chains its own states, never another's
      time.sleep(seconds)
      return name, jnp.zeros(())
    return step
  seconds = tuning.measure({"slow": sleeper("slow", 0.012), "fast": sleeper("fast", 0.003)},
                           lambda: "fresh", None, rounds=3, round_seconds=0.03)
  assert 0.003 <= seconds["fast"] < 0.008 < 0.012 <= seconds["slow"] < 0.03


def _forced(choice):
  """A stand-in for ``tuning.measure`` that makes ``choice`` the fastest, and records that it
  was called."""
  calls = []

  def measure(steps, fresh_state, batch):
    calls.append(sorted(steps))
    return {name: (0.001 if name == choice else 0.002) for name in steps}
  return measure, calls


def test_autotune_keeps_the_fastest_records_it_and_leaves_training_unchanged(tmp_path,
                                                                              monkeypatch):
  measure, calls = _forced("eigen_convolutions")  # the default: same program as untuned
  monkeypatch.setattr(tuning, "measure", measure)
  tuned, plain = str(tmp_path / "tuned"), str(tmp_path / "plain")
  deepflow.train_and_evaluate(tiny_config("train.autotune=True", model=CNN), tuned)
  deepflow.train_and_evaluate(tiny_config(model=CNN), plain)
  assert calls == [sorted(tuning.CPU_CANDIDATES)]
  record = json.loads(open(os.path.join(tuned, tuning.RECORD)).read())
  assert record["choice"] == "eigen_convolutions" and record["platform"] == "cpu"
  assert record["options"] == tuning.CPU_CANDIDATES["eigen_convolutions"]
  assert set(record["ms_per_step"]) == set(tuning.CPU_CANDIDATES)
  assert not os.path.exists(os.path.join(plain, tuning.RECORD))
  # Timing ran steps on copies of the first state: the run trained exactly as without tuning.
  for x, y in zip(jax.tree.leaves(final_params(tiny_config(model=CNN), tuned)[0]),
                  jax.tree.leaves(final_params(tiny_config(model=CNN), plain)[0])):
    np.testing.assert_array_equal(x, y)


def test_resumed_run_reuses_the_recorded_choice_bit_identically(tmp_path, monkeypatch):
  config = tiny_config("train.autotune=True", "train.steps=8", "train.checkpoint_every=4",
                       model=CNN)
  measure, calls = _forced("ynnpack_convolutions")  # not the CPU default
  monkeypatch.setattr(tuning, "measure", measure)
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  deepflow.train_and_evaluate(config, a)
  shutil.copytree(a, b)
  shutil.rmtree(os.path.join(b, "checkpoints", "8"))  # as if killed after step 4's save
  assert calls
  measure, calls = _forced("eigen_convolutions")  # would choose the other one
  monkeypatch.setattr(tuning, "measure", measure)
  used = []
  original = Experiment.use_compiler_options
  monkeypatch.setattr(Experiment, "use_compiler_options",
                      lambda self, options: used.append(options) or original(self, options))
  deepflow.train_and_evaluate(config, b)
  assert not calls  # the record was read, nothing timed
  assert used[-1] == tuning.CPU_CANDIDATES["ynnpack_convolutions"]  # the steps compiled by it
  # The record applies without train.autotune too: a run resumed or re-evaluated with it off.
  used.clear()
  deepflow.train_and_evaluate(tiny_config("train.steps=8", "train.checkpoint_every=4",
                                          model=CNN), b)
  assert used[-1] == tuning.CPU_CANDIDATES["ynnpack_convolutions"]
  record = json.loads(open(os.path.join(b, tuning.RECORD)).read())
  assert record["choice"] == "ynnpack_convolutions"
  reopened = Experiment.from_workdir(b).experiment  # eval, export, ...: the same programs
  assert reopened.compiler_options == tuning.CPU_CANDIDATES["ynnpack_convolutions"]
  pa, _, _ = final_params(config, a)
  pb, _, step = final_params(config, b)
  assert step == 8
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(x, y)


def test_autotune_on_another_platform_tunes_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  monkeypatch.setattr(tuning, "measure", lambda *a: pytest.fail("timed on a TPU"))
  exp = Experiment(tiny_config("train.autotune=True", model=CNN), str(tmp_path))
  assert tuning.autotune(exp, None, None) == exp.base_options
  assert not os.path.exists(tmp_path / tuning.RECORD)


@pytest.mark.parametrize("text", [
    "{not json", '{"choice": "eigen_convolutions"}', "[1, 2]",
    '{"platform": "cpu", "options": {}}',  # no choice
    '{"platform": "cpu", "choice": "x", "options": {"no_such_option": 1}}'])
def test_a_broken_record_is_a_one_line_error(tmp_path, text):
  (tmp_path / tuning.RECORD).write_text(text)
  with pytest.raises(ConfigError, match="is not a usable autotune record.*delete it") as error:
    deepflow.train_and_evaluate(tiny_config("train.autotune=True"), str(tmp_path))
  assert "\n" not in str(error.value)


def test_processes_make_process_0s_calls(monkeypatch):
  """Each process sizes its rounds from its own timing, but the steps hold collectives: every
  process must make process 0's number of calls, or they pair different programs and hang."""
  made = {"a": 0}

  def step(state, batch):
    made["a"] += 1
    return state, jnp.zeros(())
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(tuning.multihost_utils, "broadcast_one_to_all",
                      lambda value: np.full_like(value, 7))  # process 0 sized its rounds to 7
  tuning.measure({"a": step}, lambda: "fresh", None, rounds=2, round_seconds=10.0)
  assert made["a"] == 2 + 2 * 7  # compile + sizing calls, then 2 rounds of process 0's 7


def test_a_task_overriding_grads_is_refused():
  from deepflow.tasks.base import Task
  with pytest.raises(TypeError, match="override trained_grads instead"):
    type("OwnGrads", (Task,), {"grads": lambda self, *a: None})
