"""Tests for the Cloud TPU scripts in tpu/: no network, no real gcloud.

What is checked: every script parses (bash -n) and passes shellcheck (if installed); --dry-run
prints the exact gcloud commands for the settings given as flags or env vars, and those lines
run back through bash unchanged; a missing setting is one line on stderr and exit 2; worker.sh
really starts, supervises and reports jobs (SIGTERM included); and babysit.sh's loop really
recreates, reinstalls and relaunches against a fake `gcloud` that returns canned states.
"""
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TPU = ROOT / "tpu"
ENTRY_SCRIPTS = ["create.sh", "install.sh", "launch.sh", "logs.sh", "status.sh", "babysit.sh",
                 "delete.sh", "sweep.sh"]
# Settings the scripts read from the environment: cleared so the caller's shell cannot leak in.
SETTINGS = ["TPU_NAME", "ZONE", "PROJECT", "QUEUED", "QUEUED_RESOURCE", "SSH_FLAGS",
            "ACCELERATOR_TYPE", "RUNTIME_VERSION", "CAPACITY", "SERVICE_ACCOUNT", "SCOPES",
            "CREATE_FLAGS", "SRC_DIR", "REPO_URL", "REPO_REF", "DEEPFLOW_PYTHON", "JAX_PIP_SPEC",
            "EXTRA_PIP_PACKAGES", "EXPERIMENT", "CONFIG_FILE", "BUCKET", "WORKDIR", "RUN_NAME",
            "DISTRIBUTED", "STORAGE", "STUDY", "FOLLOW", "WAIT", "POLL_SECONDS", "WORKER", "LOG_LINES", "MAX_RETRIES",
            "UNREACHABLE_LIMIT", "DELETE_WHEN_DONE", "DRY_RUN", "DEEPFLOW_VENV", "DEEPFLOW_LOGS"]
SCOPE = "--scopes=https://www.googleapis.com/auth/cloud-platform"

# A stand-in for gcloud: records each call (one line, arguments separated by \x1f) and answers
# `describe` with the next line of $FAKE/states and `... worker.sh status` with the next line of
# $FAKE/jobs (the last line repeats once a queue is down to one).
FAKE_GCLOUD = r"""#!/usr/bin/env bash
printf '%s\x1f' "$@" >>"$FAKE/calls"
printf '\n' >>"$FAKE/calls"
pop() {
  local f="$FAKE/$1" line
  line="$(head -n 1 "$f")"
  if [ "$(wc -l <"$f")" -gt 1 ]; then tail -n +2 "$f" >"$f.tmp" && mv "$f.tmp" "$f"; fi
  printf '%s\n' "$line"
}
case "$*" in
  *" describe "*)
    s="$(pop states)"
    case "$s" in
      NOT_FOUND) echo "ERROR: (gcloud) NOT_FOUND: Resource not found." >&2; exit 1 ;;
      DENIED) echo "ERROR: (gcloud) PERMISSION_DENIED: no." >&2; exit 1 ;;
    esac
    echo "$s" ;;
  *"worker.sh status"*) pop jobs ;;
  *"worker.sh logs"*) echo "[t1v-n-w-0] deepflow: a log line" ;;
esac
exit 0
"""


def clean_env(tmp_path, **extra):
  env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
  env["TMPDIR"] = str(tmp_path)
  env.update(extra)
  return env


@pytest.fixture
def fake(tmp_path):
  """A directory with a fake gcloud first on PATH; returns (env, fake_dir)."""
  fake_dir = tmp_path / "fake"
  bin_dir = tmp_path / "bin"
  fake_dir.mkdir()
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(FAKE_GCLOUD)
  gcloud.chmod(0o755)
  env = clean_env(tmp_path, FAKE=str(fake_dir), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  return env, fake_dir


def calls(fake_dir):
  path = fake_dir / "calls"
  if not path.exists():
    return []
  return [line.split("\x1f")[:-1] for line in path.read_text().splitlines()]


def run(script, *args, env, timeout=60):
  return subprocess.run(["bash", str(TPU / script), *args], env=env, capture_output=True,
                        text=True, timeout=timeout, cwd=env.get("TMPDIR"))


def dry(script, *args, env):
  """Runs with --dry-run; no gcloud may be called; returns the printed lines."""
  env, fake_dir = env
  before = calls(fake_dir)
  r = run(script, "--dry-run", *args, env=env)
  assert r.returncode == 0, r.stderr
  assert calls(fake_dir) == before, "a dry run called gcloud"
  return r.stdout.splitlines()


def remote_argv(line):
  """The remote command of a printed `tpu-vm ssh ... --command=...` line, split into words."""
  words = shlex.split(line)
  (command,) = [w for w in words if w.startswith("--command=")]
  return shlex.split(command[len("--command="):])


# ---------------------------------------------------------------------------------------------
# Syntax and lint
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", sorted(p.name for p in TPU.glob("*.sh")))
def test_bash_syntax(script):
  r = subprocess.run(["bash", "-n", str(TPU / script)], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr


def test_every_entry_script_is_tested_and_executable():
  scripts = {p.name for p in TPU.glob("*.sh")}
  assert scripts == set(ENTRY_SCRIPTS) | {"common.sh", "worker.sh"}
  for name in ENTRY_SCRIPTS + ["worker.sh"]:
    assert os.access(TPU / name, os.X_OK), name
    assert (TPU / name).read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in (TPU / name).read_text()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck():
  r = subprocess.run(["shellcheck", "-x", *sorted(str(p) for p in TPU.glob("*.sh"))],
                     capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
def test_help(script, fake):
  env, fake_dir = fake
  r = run(script, "--help", env=env)
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith(f"Usage: tpu/{script}")
  for flag in ("--name", "--zone", "--project", "--dry-run", "[TPU_NAME]", "[ZONE]"):
    assert flag in r.stdout
  assert calls(fake_dir) == []


def real_gcloud():
  path = shutil.which("gcloud")
  return path if path and Path(path).resolve().parent.name == "bin" else None


@pytest.mark.skipif(real_gcloud() is None, reason="the gcloud CLI is not installed")
def test_commands_pass_the_real_gcloud_parser(fake, tmp_path):
  """Each printed gcloud command gets past the installed gcloud's argument parser.

  gcloud answers a parse error with status 2 before doing anything. With an empty config dir, no
  GCE metadata lookup and the TPU API pointed at a closed local port, a well-formed command can
  only stop at "no active account" (status 1): nothing reaches Google Cloud.
  """
  env, fake_dir = fake
  lines = []
  base = {**env, "TPU_NAME": "df", "ZONE": "us-central2-b", "PROJECT": "deepflow-parse-test"}
  for script, *args in [
      ("create.sh", "--accelerator-type", "v4-32", "--capacity", "spot",
       "--service-account", "sa@deepflow-parse-test.iam.gserviceaccount.com"),
      ("create.sh", "--accelerator-type", "v6e-8", "--queued", "--capacity", "reserved"),
      ("delete.sh",), ("delete.sh", "--queued"), ("status.sh", "--run-name", "r"),
      ("install.sh",), ("launch.sh", "--experiment", "digits_cnn", "--bucket", "b", "--", MESH)]:
    lines += [l for l in dry(script, *args, env=(base, fake_dir)) if l.startswith("gcloud ")
              and "worker.sh status" not in l and "worker.sh setup" not in l]
  safe = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDSDK_", "GOOGLE_"))}
  safe.update(CLOUDSDK_CONFIG=str(tmp_path / "gcloud-config"), CLOUDSDK_CORE_DISABLE_PROMPTS="1",
              CLOUDSDK_CORE_CHECK_GCE_METADATA="false",
              CLOUDSDK_API_ENDPOINT_OVERRIDES_TPU="http://127.0.0.1:9/",
              CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK="1",
              CLOUDSDK_CORE_DISABLE_USAGE_REPORTING="1")
  assert len(lines) == 8  # each distinct gcloud command shape once (one ssh: the launch)
  procs = [subprocess.Popen(["bash", "-c", line.replace("gcloud", real_gcloud(), 1)], env=safe,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
           for line in lines]  # gcloud takes a second to start: run them side by side
  for line, proc in zip(lines, procs):
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "active account" in err, (line, err)


# ---------------------------------------------------------------------------------------------
# create.sh
# ---------------------------------------------------------------------------------------------

def test_create_tpu_vm_from_flags(fake):
  out = dry("create.sh", "--name", "df-v4", "--zone", "us-central2-b", "--project", "my-proj",
            "--accelerator-type", "v4-32", "--capacity", "spot", env=fake)
  assert out == ["gcloud compute tpus tpu-vm create df-v4 --zone=us-central2-b --project=my-proj "
                 f"--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot {SCOPE}"]


def test_create_tpu_vm_from_env_matches_flags(fake):
  env, fake_dir = fake
  from_env = dry("create.sh", env=({**env, "TPU_NAME": "df-v4", "ZONE": "us-central2-b",
                                    "PROJECT": "my-proj", "ACCELERATOR_TYPE": "v4-32",
                                    "CAPACITY": "spot"}, fake_dir))
  from_flags = dry("create.sh", "--name=df-v4", "--zone=us-central2-b", "--project=my-proj",
                   "--accelerator-type=v4-32", "--capacity=spot", env=fake)
  assert from_env == from_flags


def test_flag_beats_env(fake):
  env, fake_dir = fake
  out = dry("create.sh", "--zone", "europe-west4-a",
            env=({**env, "TPU_NAME": "a", "ZONE": "us-central2-b", "ACCELERATOR_TYPE": "v4-8"},
                 fake_dir))
  assert "--zone=europe-west4-a" in out[0].split()
  assert "us-central2-b" not in out[0]


@pytest.mark.parametrize("accelerator,version", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v4-32", "tpu-ubuntu2204-base"),
    ("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_default_runtime_version(fake, accelerator, version):
  out = dry("create.sh", "--name", "t", "--zone", "z", "--accelerator-type", accelerator, env=fake)
  assert f"--version={version}" in out[0].split()
  assert "--spot" not in out[0] and "--reserved" not in out[0]  # on-demand by default


def test_explicit_runtime_version_and_extras(fake):
  out = dry("create.sh", "--name", "t", "--zone", "z", "--accelerator-type", "v6e-8",
            "--runtime-version", "v2-alpha-tpuv6e-custom", "--capacity", "reserved",
            "--service-account", "sa@p.iam.gserviceaccount.com", "--scopes=",
            "--create-flags", "--network=net --internal-ips", env=fake)
  assert out == ["gcloud compute tpus tpu-vm create t --zone=z --accelerator-type=v6e-8 "
                 "--version=v2-alpha-tpuv6e-custom --reserved "
                 "--service-account=sa@p.iam.gserviceaccount.com --network=net --internal-ips"]


@pytest.mark.parametrize("capacity,flag", [("spot", "--spot"), ("reserved", "--reserved"),
                                           ("on-demand", None)])
def test_create_queued_resource(fake, capacity, flag):
  env, fake_dir = fake
  out = dry("create.sh", "--queued", "--capacity", capacity,
            env=({**env, "TPU_NAME": "df-v5e", "ZONE": "us-west4-a",
                  "ACCELERATOR_TYPE": "v5litepod-16"}, fake_dir))
  expected = ("gcloud compute tpus queued-resources create df-v5e --zone=us-west4-a "
              "--node-id=df-v5e --accelerator-type=v5litepod-16 "
              "--runtime-version=v2-alpha-tpuv5-lite" + (f" {flag}" if flag else "") + f" {SCOPE}")
  # Then it waits for the queued resource to become ACTIVE.
  assert out == [expected, "gcloud compute tpus queued-resources describe df-v5e "
                           "--zone=us-west4-a --format='value(state.state)'"]


def test_create_queued_resource_named_and_no_wait(fake):
  out = dry("create.sh", "--name", "node", "--zone", "z", "--accelerator-type", "v5p-8",
            "--queued", "--queued-resource", "qr1", "--no-wait", env=fake)
  assert len(out) == 1
  assert out[0].startswith(
      "gcloud compute tpus queued-resources create qr1 --zone=z --node-id=node ")


def test_create_waits_for_queued_resource_until_active(fake):
  env, fake_dir = fake
  (fake_dir / "states").write_text("WAITING_FOR_RESOURCES\nPROVISIONING\nACTIVE\n")
  r = run("create.sh", "--name", "n", "--zone", "z", "--accelerator-type", "v6e-8", "--queued",
          "--poll-seconds", "0", env=env)
  assert r.returncode == 0, r.stderr
  verbs = [c[3] for c in calls(fake_dir)]
  assert verbs == ["create", "describe", "describe", "describe"]
  assert "state: ACTIVE" in r.stderr


def test_create_fails_when_queued_resource_fails(fake):
  env, fake_dir = fake
  (fake_dir / "states").write_text("WAITING_FOR_RESOURCES\nFAILED\n")
  r = run("create.sh", "--name", "n", "--zone", "z", "--accelerator-type", "v6e-8", "--queued",
          "--poll-seconds", "0", env=env)
  assert r.returncode == 1
  assert "FAILED" in r.stderr.splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# install.sh
# ---------------------------------------------------------------------------------------------

def test_install_by_copy(fake, tmp_path):
  src = tmp_path / "src"
  (src / "deepflow").mkdir(parents=True)
  out = dry("install.sh", "--name", "df", "--zone", "z", "--src", str(src), env=fake)
  tarball = f"{tmp_path}/deepflow-src-df.tgz"
  assert len(out) == 3
  assert out[0].startswith(f"tar -czf {tarball} --exclude=./.git --exclude=./.venv ")
  assert out[0].endswith(f"-C {src} .")
  assert out[1] == (f"gcloud compute tpus tpu-vm scp {tarball} df:deepflow-src.tgz --zone=z "
                    "--worker=all")
  assert out[2].startswith("gcloud compute tpus tpu-vm ssh df --zone=z --worker=all --command=")
  remote = remote_argv(out[2])
  assert remote[:3] == ["set", "-e;", "rm"]
  assert "tar -xzf deepflow-src.tgz -C deepflow &&" in " ".join(remote)
  assert remote[-9:] == ["bash", "deepflow/tpu/worker.sh", "setup", "--python", "3.11",
                         "--jax", "jax[tpu]", "--pip", "gcsfs"]


def test_install_by_git_clone(fake):
  env, fake_dir = fake
  out = dry("install.sh", "--repo-url", "https://github.com/org/deepflow.git", "--ref", "v0.1",
            "--python", "3.12", "--jax", "jax[tpu]==0.10.2", "--pip-extra", "gcsfs tensorboard",
            env=({**env, "TPU_NAME": "df", "ZONE": "z", "PROJECT": "p"}, fake_dir))
  assert len(out) == 1  # no tarball, no scp
  assert out[0].startswith("gcloud compute tpus tpu-vm ssh df --zone=z --project=p --worker=all ")
  assert remote_argv(out[0]) == [
      "set", "-e;", "rm", "-rf", "deepflow", "&&", "git", "clone", "-q",
      "https://github.com/org/deepflow.git", "deepflow", "&&", "git", "-C", "deepflow", "checkout",
      "-q", "v0.1", "&&", "bash", "deepflow/tpu/worker.sh", "setup", "--python", "3.12", "--jax",
      "jax[tpu]==0.10.2", "--pip", "gcsfs", "--pip", "tensorboard"]


def test_install_really_runs_tar_scp_ssh(fake, tmp_path):
  env, fake_dir = fake
  src = tmp_path / "src"
  (src / "deepflow").mkdir(parents=True)
  (src / "deepflow" / "__init__.py").write_text("")
  (src / ".venv").mkdir()
  (src / ".venv" / "big").write_text("x")
  r = run("install.sh", "--name", "df", "--zone", "z", "--src", str(src), env=env)
  assert r.returncode == 0, r.stderr
  assert [c[3] for c in calls(fake_dir)] == ["scp", "ssh"]
  members = subprocess.run(["tar", "-tzf", str(tmp_path / "deepflow-src-df.tgz")],
                           capture_output=True, text=True, check=True).stdout.split()
  assert "./deepflow/__init__.py" in members
  assert not any(".venv" in m for m in members)


# ---------------------------------------------------------------------------------------------
# launch.sh
# ---------------------------------------------------------------------------------------------

MESH = "--config.mesh.shape={'data': -1, 'model': 2}"


def test_launch_command(fake):
  out = dry("launch.sh", "--name", "df", "--zone", "us-central2-b", "--experiment", "digits_cnn",
            "--bucket", "gs://my-bucket/", "--config.train.steps=100",
            "--env", "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2", "--", MESH, env=fake)
  assert len(out) == 1
  assert out[0].startswith("gcloud compute tpus tpu-vm ssh df --zone=us-central2-b --worker=all "
                           "--command=")
  assert remote_argv(out[0]) == [
      "bash", "deepflow/tpu/worker.sh", "start", "digits_cnn",
      "--env", "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2", "--",
      "deepflow", "train", "--config", "experiments/digits_cnn.py",
      "--workdir", "gs://my-bucket/runs/digits_cnn", "--distributed",
      "--config.train.steps=100", MESH]


def test_launch_from_env_with_explicit_workdir_and_config(fake):
  env, fake_dir = fake
  out = dry("launch.sh", "--no-distributed", "--follow",
            env=({**env, "TPU_NAME": "df", "ZONE": "z", "CONFIG_FILE": "experiments/digits_cnn.py",
                  "WORKDIR": "gs://b/x", "RUN_NAME": "try1"}, fake_dir))
  assert remote_argv(out[0]) == [
      "bash", "deepflow/tpu/worker.sh", "start", "try1", "--", "deepflow", "train", "--config",
      "experiments/digits_cnn.py", "--workdir", "gs://b/x"]
  # --follow streams worker 0's log afterwards.
  assert out[1].startswith("gcloud compute tpus tpu-vm ssh df --zone=z --worker=0 ")
  assert remote_argv(out[1]) == ["bash", "deepflow/tpu/worker.sh", "logs", "try1", "--lines",
                                 "100", "--follow"]


def test_sweep_starts_one_study_worker_per_host(fake):
  out = dry("sweep.sh", "--name", "df", "--zone", "z", "--experiment", "digits_mlp", "--bucket",
            "b", "--storage", "postgresql://deepflow@10.0.0.5/studies", "--env", "PGPASSWORD=pw",
            "--", "--search=tpe", "--sweep=optimizer.learning_rate=loguniform(1e-4,1e-2)",
            env=fake)
  assert len(out) == 1 and "--worker=all" in out[0]
  assert remote_argv(out[0]) == [
      "bash", "deepflow/tpu/worker.sh", "start", "digits_mlp", "--env", "PGPASSWORD=pw", "--",
      "deepflow", "sweep", "--config", "experiments/digits_mlp.py",
      "--workdir", "gs://b/runs/digits_mlp", "--study", "digits_mlp",
      "--storage", "postgresql://deepflow@10.0.0.5/studies", "--search=tpe",
      "--sweep=optimizer.learning_rate=loguniform(1e-4,1e-2)"]


def test_dry_run_lines_are_copy_pastable(fake, tmp_path):
  """Each printed line, run by bash, calls gcloud with exactly the arguments the script uses."""
  env, fake_dir = fake
  args = ["--name", "df", "--zone", "z", "--experiment", "e", "--bucket", "b",
          "--env", "A=it's $HOME", "--", MESH, '--config.data.source=tfds:"x"']
  printed = dry("launch.sh", *args, env=fake)
  subprocess.run(["bash", "-c", "\n".join(printed)], env=env, check=True, cwd=tmp_path)
  (executed,) = calls(fake_dir)
  assert executed == shlex.split(printed[0])[1:]
  command = executed[-1][len("--command="):]
  argv = subprocess.run(["bash", "-c", f"set -- {command}; printf '%s\\n' \"$@\""],
                        capture_output=True, text=True, check=True).stdout.splitlines()
  assert argv[-2:] == [MESH, '--config.data.source=tfds:"x"']
  assert "A=it's $HOME" in argv


def test_launch_warns_about_local_workdir(fake):
  env, _ = fake
  r = run("launch.sh", "--dry-run", "--name", "n", "--zone", "z", "--experiment", "digits_cnn",
          "--workdir", "/tmp/run", env=env)
  assert r.returncode == 0
  assert "not on GCS" in r.stderr


# ---------------------------------------------------------------------------------------------
# logs.sh, status.sh, delete.sh
# ---------------------------------------------------------------------------------------------

def test_logs(fake):
  out = dry("logs.sh", "--name", "df", "--zone", "z", "--experiment", "e", "--worker", "all",
            "--lines", "20", "--follow", env=fake)
  assert out == ["gcloud compute tpus tpu-vm ssh df --zone=z --worker=all "
                 "--command='bash deepflow/tpu/worker.sh logs e --lines 20 --follow'"]


def test_status_dry_run(fake):
  out = dry("status.sh", "--name", "df", "--zone", "z", "--run-name", "e", env=fake)
  assert out[0] == "gcloud compute tpus tpu-vm describe df --zone=z --format='value(state)'"
  assert out[1].startswith("gcloud compute tpus tpu-vm ssh df --zone=z --worker=0 --command=")


def test_status_reports_state_and_job(fake):
  env, fake_dir = fake
  (fake_dir / "states").write_text("READY\n")
  (fake_dir / "jobs").write_text("exited 0\n")
  r = run("status.sh", "--name", "df", "--zone", "z", "--run-name", "e", env=env)
  assert r.returncode == 0, r.stderr
  assert r.stdout.splitlines() == ["state: READY", "job: exited 0"]


def test_delete(fake):
  assert dry("delete.sh", "--name", "df", "--zone", "z", env=fake) == [
      "gcloud compute tpus tpu-vm delete df --zone=z --quiet"]
  env, fake_dir = fake
  assert dry("delete.sh", "--queued", env=({**env, "TPU_NAME": "df", "ZONE": "z",
                                            "PROJECT": "p", "QUEUED": "1"}, fake_dir)) == [
      "gcloud compute tpus queued-resources delete df --zone=z --project=p --force --quiet"]


# ---------------------------------------------------------------------------------------------
# Errors: one line on stderr, exit 2
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script,args,missing", [
    ("create.sh", ["--zone", "z", "--accelerator-type", "v4-8"], "--name (or env TPU_NAME)"),
    ("create.sh", ["--name", "n", "--accelerator-type", "v4-8"], "--zone (or env ZONE)"),
    ("create.sh", ["--name", "n", "--zone", "z"], "--accelerator-type (or env ACCELERATOR_TYPE)"),
    ("install.sh", ["--zone", "z"], "--name (or env TPU_NAME)"),
    ("launch.sh", ["--name", "n", "--zone", "z", "--bucket", "b"], "--experiment"),
    ("launch.sh", ["--name", "n", "--zone", "z", "--experiment", "e"], "--workdir"),
    ("logs.sh", ["--name", "n", "--zone", "z"], "--run-name"),
    ("status.sh", ["--name", "n"], "--zone (or env ZONE)"),
    ("babysit.sh", ["--name", "n", "--zone", "z", "--experiment", "e", "--bucket", "b"],
     "--accelerator-type"),
    ("delete.sh", ["--name", "n"], "--zone (or env ZONE)"),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_missing_setting(fake, script, args, missing, dry_run):
  env, fake_dir = fake
  r = run(script, *args, *(["--dry-run"] if dry_run else []), env=env)
  assert r.returncode == 2
  lines = r.stderr.splitlines()
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith(f"tpu/{script}: error: missing required setting {missing}")
  assert r.stdout == ""
  assert calls(fake_dir) == []


@pytest.mark.parametrize("args,message", [
    (["--bogus"], "unknown flag '--bogus'"),
    (["--capacity", "cheap"], "--capacity must be on-demand, spot or reserved"),
    (["--accelerator-type", "v99-8"], "no default --version"),
    (["--zone"], "flag '--zone' needs a value"),
    (["stray"], "unexpected argument 'stray'"),
    (["--config.train.steps=1"], "unknown flag '--config.train.steps=1'"),
])
def test_bad_usage(fake, args, message):
  env, fake_dir = fake
  r = run("create.sh", "--name", "n", "--zone", "z", "--accelerator-type", "v4-8", *args, env=env)
  assert r.returncode == 2
  assert len(r.stderr.splitlines()) == 1 and message in r.stderr, r.stderr
  assert calls(fake_dir) == []


# ---------------------------------------------------------------------------------------------
# worker.sh, run locally in a fake home directory
# ---------------------------------------------------------------------------------------------

FAKE_DEEPFLOW = r"""#!/usr/bin/env bash
echo "fake deepflow $* in $(pwd) FOO=${FOO:-}"
trap 'echo "saving on SIGTERM"; exit 0' TERM   # like deepflow: save, then exit 0
case "${FAKE_MODE:-ok}" in
  ok) exit 0 ;;
  fail) echo "config error" >&2; exit 3 ;;
  wait) while true; do sleep 0.05; done ;;
esac
"""


@pytest.fixture
def worker(tmp_path):
  """A fake TPU worker: $HOME/deepflow holds tpu/, a fake `deepflow` is on PATH."""
  home = tmp_path / "home"
  shutil.copytree(TPU, home / "deepflow" / "tpu")
  bin_dir = tmp_path / "wbin"
  bin_dir.mkdir()
  (bin_dir / "deepflow").write_text(FAKE_DEEPFLOW)
  (bin_dir / "deepflow").chmod(0o755)
  env = clean_env(tmp_path, HOME=str(home), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  started = []

  def call(*args, mode="ok", check=True):
    r = subprocess.run(["bash", "deepflow/tpu/worker.sh", *args], env={**env, "FAKE_MODE": mode},
                       capture_output=True, text=True, cwd=home, timeout=30)
    if check:
      assert r.returncode == 0, r.stderr
    if args[0] == "start" and r.returncode == 0:
      started.append((home / "deepflow-logs" / f"{args[1]}.pid").read_text().strip())
    return r

  def status(run_name, wait_while="running"):
    deadline = time.time() + 20
    while True:
      s = call("status", run_name).stdout.strip()
      if s != wait_while or time.time() > deadline:
        return s
      time.sleep(0.05)

  yield call, status, home
  for pid in started:  # never leave a job behind
    try:
      os.killpg(int(pid), signal.SIGKILL)
    except ProcessLookupError:
      pass


def test_worker_job_lifecycle(worker):
  call, status, home = worker
  assert status("r") == "missing"  # no venv yet
  (home / "deepflow-venv" / "bin").mkdir(parents=True)
  (home / "deepflow-venv" / "bin" / "python").write_text("")
  (home / "deepflow-venv" / "bin" / "python").chmod(0o755)
  assert status("r") == "none"
  call("start", "r", "--env", "FOO=bar baz", "--", "deepflow", "train", "--config", "x.py")
  assert status("r") == "exited 0"
  log = (home / "deepflow-logs" / "r.log").read_text()
  assert f"fake deepflow train --config x.py in {home / 'deepflow'} FOO=bar baz" in log
  assert call("logs", "r", "--lines", "1").stdout.strip().endswith("exited 0")


def test_worker_failure_and_sigterm(worker):
  call, status, home = worker
  call("start", "bad", "--", "deepflow", "train", mode="fail")
  assert status("bad") == "exited 3"
  call("start", "long", "--", "deepflow", "train", mode="wait")
  assert status("long", wait_while="none") == "running"
  again = call("start", "long", "--", "deepflow", "train", mode="wait", check=False)
  assert again.returncode == 1 and "already running" in again.stderr
  call("stop", "long")
  # deepflow saved and exited 0, but it was SIGTERM: not a finished run.
  assert status("long") == "terminated 0"
  assert "saving on SIGTERM" in (home / "deepflow-logs" / "long.log").read_text()


def test_worker_setup_installs_editable_with_jax_tpu(worker, tmp_path):
  """setup with a fake python3: uv makes the venv, then pip install -e REPO jax[tpu] extras."""
  call, status, home = worker
  fake_bin = tmp_path / "pybin"
  fake_bin.mkdir()
  log = tmp_path / "python3.log"
  (fake_bin / "python3").write_text(f"""#!/usr/bin/env bash
echo "python3 $*" >>{log}
if [ "$1 $2 $3" = "-m uv venv" ]; then
  mkdir -p "$6/bin"
  printf '#!/usr/bin/env bash\\necho "venv python $*" >>{log}\\n' >"$6/bin/python"
  chmod +x "$6/bin/python"
fi
exit 0
""")
  (fake_bin / "python3").chmod(0o755)
  env = clean_env(tmp_path, HOME=str(home), PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
  r = subprocess.run(["bash", "deepflow/tpu/worker.sh", "setup", "--python", "3.12", "--jax",
                      "jax[tpu]==0.10.2", "--pip", "gcsfs"], env=env, cwd=home,
                     capture_output=True, text=True, timeout=30)
  assert r.returncode == 0, r.stderr
  lines = log.read_text().splitlines()
  venv = home / "deepflow-venv"
  assert f"python3 -m uv venv --python 3.12 {venv}" in lines
  assert (f"python3 -m uv pip install --python {venv}/bin/python -U -e {home / 'deepflow'} "
          "jax[tpu]==0.10.2 gcsfs") in lines
  assert lines[-1].startswith("venv python -c import deepflow, jax")


# ---------------------------------------------------------------------------------------------
# babysit.sh against a fake gcloud
# ---------------------------------------------------------------------------------------------

def babysit(fake, tmp_path, states, jobs, *extra):
  env, fake_dir = fake
  (fake_dir / "states").write_text("\n".join(states) + "\n")
  (fake_dir / "jobs").write_text("\n".join(jobs) + "\n")
  src = tmp_path / "src"
  (src / "deepflow").mkdir(parents=True, exist_ok=True)
  r = run("babysit.sh", "--name", "df", "--zone", "z", "--accelerator-type", "v4-32",
          "--capacity", "spot", "--experiment", "digits_cnn", "--bucket", "b", "--src", str(src),
          "--poll-seconds", "0", *extra, "--", "--config.train.steps=5000", env=env)
  return r, calls(fake_dir)


def kinds(cs):
  """Names each recorded gcloud call: describe, create, delete, scp, install, launch, status..."""
  out = []
  for c in cs:
    verb = c[3]
    if verb == "ssh":
      command = c[-1]
      verb = next(k for k in ("setup", "start", "status", "logs") if f"worker.sh {k}" in command)
      verb = {"setup": "install", "start": "launch"}.get(verb, verb)
    out.append(verb)
  return out


def expected_launch(fake):
  """What launch.sh would run: babysit must relaunch exactly that command."""
  (line,) = dry("launch.sh", "--name", "df", "--zone", "z", "--experiment", "digits_cnn",
                "--bucket", "b", "--", "--config.train.steps=5000", env=fake)
  return shlex.split(line)[1:]


def test_babysit_recovers_from_preemption(fake, tmp_path):
  r, cs = babysit(fake, tmp_path,
                  ["READY", "PREEMPTED", "READY", "READY", "READY", "READY"],
                  ["running", "missing", "running", "exited 0"])
  assert r.returncode == 0, r.stderr
  assert kinds(cs) == ["describe", "status",          # running
                       "describe", "delete", "create",  # preempted: recreate
                       "describe", "status", "scp", "install", "launch",  # fresh TPU
                       "describe", "status",          # running
                       "describe", "status",          # exited 0 ...
                       "describe"]                    # ... and still READY: done
  create = [c for c in cs if c[3] == "create"][0]
  assert create[:5] == ["compute", "tpus", "tpu-vm", "create", "df"]
  assert "--spot" in create and "--accelerator-type=v4-32" in create
  launch = [c for c in cs if kinds([c]) == ["launch"]][0]
  assert launch == expected_launch(fake)
  assert "run complete" in r.stderr


def test_babysit_relaunches_after_sigterm_on_a_healthy_tpu(fake, tmp_path):
  r, cs = babysit(fake, tmp_path, ["READY"], ["terminated 0", "running", "exited 0"])
  assert r.returncode == 0, r.stderr
  assert kinds(cs) == ["describe", "status", "logs", "launch", "describe", "status",
                       "describe", "status", "describe"]
  assert "retry 1 of 10" in r.stderr


def test_babysit_does_not_trust_exit_0_during_preemption(fake, tmp_path):
  r, cs = babysit(fake, tmp_path, ["READY", "PREEMPTED", "NOT_FOUND", "READY"],
                  ["exited 0", "missing", "exited 0"])
  assert r.returncode == 0, r.stderr
  assert kinds(cs) == ["describe", "status", "describe",  # exited 0, but then PREEMPTED
                       "describe", "create",               # gone: create (nothing to delete)
                       "describe", "status", "scp", "install", "launch",
                       "describe", "status", "describe"]


def test_babysit_gives_up_after_max_retries(fake, tmp_path):
  r, cs = babysit(fake, tmp_path, ["PREEMPTED"], ["running"], "--max-retries", "2")
  assert r.returncode == 1
  assert kinds(cs).count("create") == 3  # the first start and 2 retries
  assert "gave up after 2 retries" in r.stderr.splitlines()[-1]


def test_babysit_does_not_recreate_on_api_errors(fake, tmp_path):
  r, cs = babysit(fake, tmp_path, ["DENIED", "READY"], ["running", "exited 0"])
  assert r.returncode == 0, r.stderr
  assert "create" not in kinds(cs) and "delete" not in kinds(cs)
  assert "PERMISSION_DENIED" in r.stderr


def test_babysit_queued_spot_and_delete_when_done(fake, tmp_path):
  r, cs = babysit(fake, tmp_path,
                  ["SUSPENDED", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE", "ACTIVE",
                   "ACTIVE"],
                  ["missing", "exited 0"], "--queued", "--delete-when-done")
  assert r.returncode == 0, r.stderr
  assert kinds(cs) == ["describe", "delete", "create", "describe", "describe",
                       "describe", "status", "scp", "install", "launch",
                       "describe", "status", "describe", "delete"]
  delete = [c for c in cs if c[3] == "delete"][0]
  assert delete == ["compute", "tpus", "queued-resources", "delete", "df", "--zone=z", "--force",
                    "--quiet"]
  create = [c for c in cs if c[3] == "create"][0]
  assert create[:6] == ["compute", "tpus", "queued-resources", "create", "df", "--zone=z"]
  assert "--node-id=df" in create and "--spot" in create
  assert "--runtime-version=tpu-ubuntu2204-base" in create


def test_babysit_dry_run_prints_one_recovery_cycle(fake):
  out = dry("babysit.sh", "--name", "df", "--zone", "z", "--accelerator-type", "v6e-8",
            "--experiment", "e", "--bucket", "b", env=fake)
  verbs = [shlex.split(line)[4] if line.startswith("gcloud") else line.split()[0] for line in out]
  assert verbs == ["describe", "delete", "create", "tar", "scp", "ssh", "ssh", "ssh"]


def test_babysit_checks_the_source_before_creating_anything(fake, tmp_path):
  env, fake_dir = fake
  r = run("babysit.sh", "--name", "df", "--zone", "z", "--accelerator-type", "v4-8",
          "--experiment", "e", "--bucket", "b", "--src", str(tmp_path / "nowhere"), env=env)
  assert r.returncode == 2
  assert "is not a deepflow checkout" in r.stderr and len(r.stderr.splitlines()) == 1
  assert calls(fake_dir) == []
