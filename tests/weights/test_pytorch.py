"""PyTorch weights in deepflow: a tiny CNN's state_dict (tests/fixtures, written once by
tools/make_pytorch_fixture.py) loaded through the layout map gives PyTorch's outputs."""
import os

import jax
import numpy as np

from deepflow.train import init_from
from deepflow.train.experiment import Experiment
from deepflow.weights import files, pytorch
from tests.helpers import tiny_config

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures",
                       "tiny_cnn_pytorch")
TORCH_NAMES = [("/conv(\\d)/", "/backbone/Conv_\\1/"), ("/bn(\\d)/", "/backbone/BatchNorm_\\1/"),
               ("/fc/", "/head/")]


def test_layout_map_transposes_and_renames():
  state_dict = {"f.0.weight": np.arange(24.).reshape(2, 3, 2, 2), "fc.weight": np.ones((5, 3)),
                "bn.weight": np.ones(2), "bn.running_var": np.ones(2),
                "bn.num_batches_tracked": np.array(3)}
  out = pytorch.from_state_dict(state_dict)
  assert sorted(out) == ["batch_stats/bn/var", "params/bn/scale", "params/f/0/kernel",
                         "params/fc/kernel"]
  np.testing.assert_array_equal(out["params/f/0/kernel"][1, 0, 2, 1],
                                state_dict["f.0.weight"][1, 2, 1, 0])  # OIHW -> HWIO
  assert out["params/fc/kernel"].shape == (3, 5)


def test_pytorch_cnn_outputs_match(tmp_path):
  config = tiny_config("model.init_layout=pytorch", f"model.init_from={FIXTURE}.safetensors",
                       f"model.init_map={TORCH_NAMES!r}",
                       model=dict(name="encoder_cnn", widths=(4, 8)), num_devices=1)
  exp = Experiment(config, None, devices=jax.devices()[:1])
  state = init_from.initial_state(exp)
  reference = np.load(FIXTURE + ".npz")
  outputs, _ = exp.task.apply(state.params, state.model_state, reference["inputs"], None,
                              train=False)
  np.testing.assert_allclose(outputs, reference["outputs"], rtol=0, atol=1e-5)
  # every tensor of the state_dict was used (num_batches_tracked aside): nothing fresh
  assert len(files.flatten({"params": state.params, **state.model_state})) == len(
      files.read(FIXTURE + ".safetensors")) - 2
