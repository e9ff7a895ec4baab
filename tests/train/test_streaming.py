"""`deepflow train` on real encoded images through ``tfds:NAME``, with worker processes: a run
SIGKILLed at an arbitrary step resumes bit-identical to an uninterrupted run without workers,
and the killed run's workers do not outlive it."""
import signal

import psutil

import deepflow
from tests.helpers import (TINY, deepflow_cli, deepflow_process, experiment_text,
                           write_experiment)
from tests.train.test_fault_tolerance import (assert_bit_identical, logged_step, params_of,
                                              wait_for_step)

# data.cache=False: streamed, as a large dataset is (workers are used only then).
IMAGE_EXPERIMENT = experiment_text({
    **TINY, "model": dict(name="mlp", hidden=(16,)), "data.source": "tfds:gen_jpeg",
    "data.cache": False,
    "data.transforms": [dict(name="random_resized_crop", size=12, scale=(0.5, 1.0)),
                        dict(name="flip"), dict(name="standardize")],
    "train.steps": 120, "train.log_every": 10, "train.checkpoint_every": 20})


def test_sigkill_with_workers_then_resume_is_bit_identical(tmp_path, image_data_dir):
  experiment = write_experiment(tmp_path / "images.py", IMAGE_EXPERIMENT)
  data = [f"--config.data.data_dir={image_data_dir}"]
  reference = str(tmp_path / "reference")
  out = deepflow_cli("train", "--config", experiment, "--workdir", reference, *data)
  assert out.returncode == 0, out.stderr
  config = deepflow.load_config(experiment, [d[len("--config."):] for d in data])
  want, _, _ = params_of(reference, config)

  workdir = str(tmp_path / "run")
  args = ["train", "--config", experiment, "--workdir", workdir, *data,
          "--config.data.workers=2"]
  process = deepflow_process(*args)
  wait_for_step(process, workdir, 50)
  workers = psutil.Process(process.pid).children(recursive=True)
  assert len(workers) >= 2
  process.send_signal(signal.SIGKILL)
  process.communicate(timeout=60)  # the workers hold its pipes until they exit too
  assert 50 <= logged_step(workdir) < 120
  _, alive = psutil.wait_procs(workers, timeout=30)
  assert not alive, "worker processes outlived the killed run"
  out = deepflow_cli(*args)
  assert out.returncode == 0, out.stderr
  assert "resuming from the checkpoint" in out.stderr
  got, got_data, step = params_of(workdir, config)
  assert step == 120 and got_data == {"next_index": 120}
  assert_bit_identical(want, got)
