"""`deepflow data prepare`: a TFDS builder prepared as ArrayRecord and trained on through
``tfds:NAME``, and the failures a user can fix as one line each."""
import gzip
import os
import re
import sys

import pytest
import tensorflow_datasets as tfds

from deepflow.data import prepare
from deepflow.registry import ConfigError
from tests.helpers import deepflow_cli as deepflow, one_line_error, write_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMPORTS = ["tests.data.builders"]


def test_prepare_then_train_on_it_through_the_cli(tmp_path):
  data_dir = str(tmp_path / "tfds")
  env = {"PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
  out = deepflow("data", "prepare", "deepflow_test_images", "--data_dir", data_dir,
                 "--imports", "tests.data.builders", env=env)
  assert out.returncode == 0, out.stderr
  assert f"deepflow_test_images/1.0.0 prepared in {data_dir} (train 96, test 32)" in out.stdout
  assert os.listdir(os.path.join(data_dir, "deepflow_test_images", "1.0.0"))
  assert any(".array_record" in f for f in
             os.listdir(os.path.join(data_dir, "deepflow_test_images", "1.0.0")))
  out = deepflow("train", "--config", write_experiment(tmp_path / "tiny.py"), "--workdir",
                 str(tmp_path / "run"), "--config.data.source=tfds:deepflow_test_images",
                 f"--config.data.data_dir={data_dir}", "--config.train.steps=2")
  assert out.returncode == 0, out.stderr
  assert "final test metrics" in out.stdout


def test_prepared_once(tmp_path):
  builder, now = prepare.prepare("deepflow_test_images", str(tmp_path), imports=IMPORTS)
  assert now and builder.info.splits["train"].num_examples == 96
  assert tfds.builder("deepflow_test_images", data_dir=str(tmp_path)).is_prepared()
  assert prepare.prepare("deepflow_test_images", str(tmp_path), imports=IMPORTS)[1] is False


@pytest.mark.parametrize("name, message", [
    ("no_such_dataset", "unknown TFDS dataset 'no_such_dataset'"),
    ("deepflow_test_images:9.9.9", "TFDS dataset 'deepflow_test_images:9.9.9': "),
    ("deepflow_test_needs_tensorflow", "TFDS builds 'deepflow_test_needs_tensorflow' with "
     "TensorFlow, which is not installed: `pip install tensorflow` for this step"),
    ("deepflow_test_needs_network", "could not download 'deepflow_test_needs_network' "
     "(ConnectionError): preparing needs network"),
    ("deepflow_test_needs_manual_files", "needs files downloaded by hand (see its TFDS catalog "
     "page) in a directory: pass --manual_dir DIR"),
])
def test_what_a_user_can_fix_is_a_config_error(tmp_path, monkeypatch, name, message):
  if "tensorflow" in name:  # `import tensorflow` fails, as where it is not installed
    monkeypatch.setitem(sys.modules, "tensorflow", None)
  with pytest.raises(ConfigError) as error:
    prepare.prepare(name, str(tmp_path), imports=IMPORTS)
  assert message in str(error.value) and "\n" not in str(error.value)


def test_an_empty_manual_dir_is_named(tmp_path):
  (tmp_path / "manual").mkdir()
  with pytest.raises(ConfigError, match=f"--manual_dir {tmp_path / 'manual'} is empty"):
    prepare.prepare("deepflow_test_needs_manual_files", str(tmp_path),
                    manual_dir=str(tmp_path / "manual"), imports=IMPORTS)
  (tmp_path / "manual" / "archive.tar").write_bytes(b"")
  builder, _ = prepare.prepare("deepflow_test_needs_manual_files", str(tmp_path),
                               manual_dir=str(tmp_path / "manual"), imports=IMPORTS)
  assert builder.info.splits["train"].num_examples == 1


def test_files_from_another_source_are_named_with_what_to_do(tmp_path):
  """Fashion-MNIST's four files in --manual_dir, but repackaged (gzip of other bytes): their
  SHA-256 is not the one TFDS ships, so TFDS refuses them; deepflow says which and what next."""
  manual = tmp_path / "manual"
  manual.mkdir()
  for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte"):
    with gzip.open(manual / f"{name}.gz", "wb") as f:
      f.write(bytes(range(16)))
  with pytest.raises(ConfigError) as error:
    prepare.prepare("fashion_mnist", str(tmp_path / "tfds"), manual_dir=str(manual))
  message = str(error.value)
  assert "\n" not in message
  assert re.fullmatch(
      rf"{manual}/\S+-ubyte\.gz \(\d+ bytes; TFDS expects [\d.]+ MiB\) does not have the "
      r"checksum TFDS records for 'fashion_mnist': the file comes from another source or was "
      r"repackaged; .* `tfds build fashion_mnist --manual_dir \S+ --register_checksums` .*",
      message), message


def test_data_takes_no_config_overrides():
  out = deepflow("data", "prepare", "mnist", "--config.data.batch_size=8")
  assert one_line_error(out) == "deepflow: error: deepflow data takes no --config overrides"
