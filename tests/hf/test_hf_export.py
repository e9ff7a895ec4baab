"""deepflow models out as Hugging Face checkpoints: written tensors are transformers' own
(name, layout, value: checked against the fixtures transformers saved) and shards get an index.
A trained run's export is tests/hf/test_hf_finetune.py's."""
import json
import os

import jax
import numpy as np
import pytest

import deepflow
from deepflow.hf import export as hf_export, files
from deepflow.registry import ConfigError

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "hf")


def tensors(directory):
  reader = files.Reader(files.weight_files(str(directory)))
  return {name: reader.read(name).astype(np.float32) for name in reader.files}


@pytest.mark.parametrize("name,scan", [("gpt2", True), ("llama_linear_bias_headdim", False),
                                       ("qwen3_qknorm_sharded", True)])
def test_written_checkpoint_is_the_transformers_one(tmp_path, name, scan):
  """Load (scanned or not), write in shards of 16 KB: the same tensors under the same names as
  the checkpoint transformers saved, an index naming every shard, a config.json describing the
  same model, and the reference's logits when read back."""
  source = os.path.join(FIXTURES, name)
  model, variables = deepflow.load_pretrained(source, dtype="float32", scan_layers=scan)
  written = hf_export.write_pretrained(model, variables, str(tmp_path), max_shard_bytes=16384)
  assert written[-2:] == [files.INDEX, files.CONFIG]
  index = json.loads((tmp_path / files.INDEX).read_text())
  assert set(index["weight_map"].values()) == set(written[:-2])
  original, exported = tensors(source), tensors(tmp_path)
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  ours = json.loads((tmp_path / files.CONFIG).read_text())
  theirs = json.loads(open(os.path.join(source, files.CONFIG)).read())
  family = deepflow.hf.family(theirs["model_type"])
  assert family.model_section(ours) == family.model_section(theirs)
  assert ours["model_type"] == theirs["model_type"] and ours["dtype"] == "float32"
  reloaded, values = deepflow.load_pretrained(str(tmp_path))
  ref = np.load(os.path.join(source, "reference.npz"))
  np.testing.assert_allclose(jax.jit(reloaded.apply)(values, ref["tokens"]), ref["logits"],
                             rtol=0, atol=1e-4)


def test_models_without_a_transformers_family_are_one_line(tmp_path):
  from deepflow.models.transformer import TransformerLM
  model = TransformerLM(num_outputs=16, vocab_size=16, positions="sinusoidal")
  with pytest.raises(ConfigError, match="cannot be written as a Hugging Face checkpoint: .*"
                                        "positions='sinusoidal'") as info:
    hf_export.write_pretrained(model, {}, str(tmp_path))
  assert "\n" not in str(info.value) and not os.listdir(tmp_path)
