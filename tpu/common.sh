# shellcheck shell=bash
# Shared code for deepflow's Cloud TPU scripts. Sourced, never run.
#
# What lives here:
#   * a tiny settings registry: every setting has an env var, a flag, a default and one help line;
#     precedence is flag > env var > default, and --help is generated from the registry;
#   * df_run, which either prints a command (--dry-run: one copy-pastable line on stdout) or traces
#     it to stderr and runs it;
#   * the gcloud operations themselves (create, install, launch, state, job status, delete), so
#     that create.sh / install.sh / launch.sh / babysit.sh ... are thin and never copy each other.
#
# Written for bash >= 3.2 (no associative arrays or namerefs); tested with bash 5.

DF_TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DF_PROG="tpu/$(basename "$0")"
# Where the repository lives on each TPU worker, relative to the remote home directory.
DF_REMOTE_DIR="deepflow"
# --dry-run prints commands on fd 3, a copy of the original stdout, so that commands printed
# inside $(...) still reach the user instead of being captured.
exec 3>&1

# ---------------------------------------------------------------------------------------------
# Messages and errors
# ---------------------------------------------------------------------------------------------

df_log() { printf '[%s %s] %s\n' "$DF_PROG" "$(date -u +%H:%M:%S)" "$*" >&2; }
df_warn() { printf '%s: warning: %s\n' "$DF_PROG" "$*" >&2; }
# A user error: one line on stderr, exit status 2.
df_die() { printf '%s: error: %s\n' "$DF_PROG" "$*" >&2; exit 2; }
# A runtime failure (the cloud said no, the job failed for good): exit status 1.
df_fail() { printf '%s: failed: %s\n' "$DF_PROG" "$*" >&2; exit 1; }

# Quotes one word for bash/zsh: bare if plain, in double quotes if it holds a ' but nothing
# special inside double quotes, else in single quotes.
_df_quote_word() {
  local w="$1"
  if [[ -n "$w" && "$w" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$w"
  elif [[ "$w" == *\'* && "$w" != *[\"\$\`\\\!]* ]]; then
    printf '"%s"' "$w"
  else
    printf "'%s'" "${w//\'/\'\\\'\'}"
  fi
}

# Prints its arguments as one line of shell words that bash (and zsh) read back unchanged.
# In --flag=VALUE words only VALUE is quoted, which reads better: --command='...'.
df_quote() {
  local out="" word q flag value
  for word in "$@"; do
    if [[ "$word" =~ ^(--?[A-Za-z0-9_.-]+=)(.*)$ ]]; then
      flag="${BASH_REMATCH[1]}"
      value="${BASH_REMATCH[2]}"
      q="$flag"
      if [[ -n "$value" ]]; then q="$flag$(_df_quote_word "$value")"; fi
    else
      q="$(_df_quote_word "$word")"
    fi
    out="${out:+$out }$q"
  done
  printf '%s\n' "$out"
}

# Runs a command, or with --dry-run prints it (stdout, one line) instead.
df_run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    df_quote "$@" >&3
    return 0
  fi
  printf '+ %s\n' "$(df_quote "$@")" >&2
  "$@"
}

# ---------------------------------------------------------------------------------------------
# Settings registry and flag parsing
# ---------------------------------------------------------------------------------------------

DF_VARS=()     # env var name of each setting
DF_FLAGS=()    # its flags, '|'-separated (first one is shown first in --help)
DF_KINDS=()    # value | switch | list
DF_HELPS=()    # one help line
DF_REQUIRED="" # space-separated env var names the running script requires (set by the script)
DF_ARGS=()     # arguments after `--` (and `--config.KEY=VALUE` overrides): passed to deepflow
DF_DESCRIPTION=""
DF_EXAMPLES=""
DF_TAKES_ARGS=0 # 1 in scripts that pass extra arguments on to deepflow (launch, babysit)

_df_register() { DF_VARS+=("$1"); DF_FLAGS+=("$2"); DF_KINDS+=("$3"); DF_HELPS+=("$4"); }

_df_truthy() { [[ "$1" =~ ^(1|true|yes|on|TRUE|YES|ON|True|Yes|On)$ ]]; }

# df_opt VAR FLAGS DEFAULT HELP: a setting with a value. The env var wins over the default.
df_opt() {
  local var="$1" flags="$2" default="$3" help="$4"
  if [[ -z "${!var:-}" ]]; then printf -v "$var" '%s' "$default"; fi
  _df_register "$var" "$flags" value "$help"
}

# df_switch VAR FLAGS DEFAULT HELP: an on/off setting (value 1 or 0); --no-FLAG turns it off.
df_switch() {
  local var="$1" flags="$2" default="$3" help="$4"
  if _df_truthy "${!var:-$default}"; then printf -v "$var" 1; else printf -v "$var" 0; fi
  _df_register "$var" "$flags" switch "$help"
}

# df_list VAR FLAGS HELP: a repeatable flag collected into the array VAR (flag only, no env).
df_list() {
  local var="$1" flags="$2" help="$3"
  eval "$var=()"
  _df_register "$var" "$flags" list "$help"
}

# Sets the index of the setting that owns flag $1 into DF_FOUND (-1 if none).
_df_lookup() {
  local i f
  DF_FOUND=-1
  for i in "${!DF_FLAGS[@]}"; do
    IFS='|' read -r -a _df_fl <<<"${DF_FLAGS[$i]}"
    for f in "${_df_fl[@]}"; do
      if [[ "$f" == "$1" ]]; then DF_FOUND=$i; return 0; fi
    done
  done
}

df_usage() {
  local i flags meta req
  local extra=""
  if ((DF_TAKES_ARGS)); then extra=" [--config.KEY=VALUE ...] [-- DEEPFLOW_ARGS ...]"; fi
  printf 'Usage: %s [flags]%s\n\n%s\n\n' "$DF_PROG" "$extra" "$DF_DESCRIPTION"
  printf 'Flags (each also read from the env var in brackets; a flag beats the env var):\n'
  for i in "${!DF_VARS[@]}"; do
    flags="${DF_FLAGS[$i]//|/, }"
    case "${DF_KINDS[$i]}" in
      value) meta=" VALUE  [${DF_VARS[$i]}]" ;;
      switch) meta="  [${DF_VARS[$i]}=1]" ;;
      list) meta=" VALUE  (repeatable, flag only)" ;;
    esac
    req=""
    if [[ " $DF_REQUIRED " == *" ${DF_VARS[$i]} "* ]]; then req=" (required)"; fi
    printf '  %s%s\n      %s%s\n' "$flags" "$meta" "${DF_HELPS[$i]}" "$req"
  done
  printf '  --dry-run  [DRY_RUN=1]\n      %s\n' \
    "Print the commands (one per line, copy-pastable) instead of running them."
  printf '  -h, --help\n      Show this help.\n'
  if [[ -n "$DF_EXAMPLES" ]]; then printf '\nExamples:\n%s\n' "$DF_EXAMPLES"; fi
}

# df_parse "$@": fills the registered settings from the command line, then checks DF_REQUIRED.
df_parse() {
  local arg name value has_value var kind
  if _df_truthy "${DRY_RUN:-0}"; then DRY_RUN=1; else DRY_RUN=0; fi
  while (($#)); do
    arg="$1"
    shift
    case "$arg" in
      -h | --help) df_usage; exit 0 ;;
      --dry-run) DRY_RUN=1; continue ;;
      --)
        ((DF_TAKES_ARGS)) || (($# == 0)) || df_die "unexpected argument '$1' (see --help)"
        DF_ARGS+=("$@")
        break
        ;;
      --config.*) # a deepflow override, passed through as is
        ((DF_TAKES_ARGS)) || df_die "unknown flag '$arg' (see --help)"
        DF_ARGS+=("$arg")
        continue
        ;;
      --*) ;;
      *)
        if ((DF_TAKES_ARGS)); then
          df_die "unexpected argument '$arg' (deepflow arguments go after --; see --help)"
        fi
        df_die "unexpected argument '$arg' (see --help)"
        ;;
    esac
    has_value=0
    if [[ "$arg" == *=* ]]; then
      name="${arg%%=*}"; value="${arg#*=}"; has_value=1
    else
      name="$arg"; value=""
    fi
    _df_lookup "$name"
    if ((DF_FOUND < 0)) && [[ "$name" == --no-* ]]; then
      _df_lookup "--${name#--no-}"
      if ((DF_FOUND >= 0)) && [[ "${DF_KINDS[$DF_FOUND]}" == switch ]]; then
        printf -v "${DF_VARS[$DF_FOUND]}" 0
        continue
      fi
      DF_FOUND=-1
    fi
    ((DF_FOUND >= 0)) || df_die "unknown flag '$name' (see --help)"
    var="${DF_VARS[$DF_FOUND]}"
    kind="${DF_KINDS[$DF_FOUND]}"
    if [[ "$kind" == switch ]]; then
      if ((has_value)); then
        if _df_truthy "$value"; then printf -v "$var" 1; else printf -v "$var" 0; fi
      else
        printf -v "$var" 1
      fi
      continue
    fi
    if ((!has_value)); then
      (($#)) || df_die "flag '$name' needs a value"
      value="$1"
      shift
    fi
    if [[ "$kind" == list ]]; then
      eval "$var+=(\"\$value\")"
    else
      printf -v "$var" '%s' "$value"
    fi
  done
  # shellcheck disable=SC2086 # a space-separated list of names, split on purpose
  df_require $DF_REQUIRED
}

# df_require VAR...: exits 2 with one line naming the first missing setting's flag and env var.
df_require() {
  local var i
  for var in "$@"; do
    if [[ -z "${!var:-}" ]]; then
      for i in "${!DF_VARS[@]}"; do
        if [[ "${DF_VARS[$i]}" == "$var" ]]; then
          df_die "missing required setting ${DF_FLAGS[$i]%%|*} (or env $var)"
        fi
      done
      df_die "missing required setting $var"
    fi
  done
}

# ---------------------------------------------------------------------------------------------
# Setting groups (each script declares the groups it uses)
# ---------------------------------------------------------------------------------------------

df_settings_resource() {
  df_opt TPU_NAME --name "" "TPU VM (node) name."
  df_opt ZONE --zone "" \
    "Zone with your TPU type, e.g. us-central2-b (v4); see gcloud compute tpus locations list."
  df_opt PROJECT --project "" "Google Cloud project (default: gcloud config's core/project)."
  df_switch QUEUED --queued 0 \
    "The TPU is (to be) made through a queued resource rather than tpu-vm create."
  df_opt QUEUED_RESOURCE --queued-resource "" "Queued resource id (default: the TPU name)."
  df_opt SSH_FLAGS --ssh-flags "" "Extra flags for every tpu-vm ssh/scp, space-separated (e.g. --internal-ip)."
}

df_settings_create() {
  df_opt ACCELERATOR_TYPE --accelerator-type "" "Slice type: v4-8, v4-32, v5litepod-8, v5litepod-16, v5p-8, v6e-8, ..."
  df_opt RUNTIME_VERSION "--version|--runtime-version" "" \
    "TPU software version (default: derived from the accelerator type, e.g. v2-alpha-tpuv6e)."
  df_opt CAPACITY --capacity on-demand "on-demand, spot or reserved."
  df_opt SERVICE_ACCOUNT --service-account "" "Service account for the TPU VMs (default: Compute Engine default)."
  df_opt SCOPES --scopes "https://www.googleapis.com/auth/cloud-platform" \
    "OAuth scopes for the TPU VMs (IAM roles then decide what they may touch); '' for gcloud's default."
  df_opt CREATE_FLAGS --create-flags "" "Extra flags for the create command, space-separated (e.g. --network=NET)."
}

df_settings_install() {
  df_opt SRC_DIR --src "$(cd "$DF_TPU_DIR/.." && pwd)" "Local deepflow checkout to copy (used without --repo-url)."
  df_opt REPO_URL --repo-url "" "Git URL to clone on every worker instead of copying --src."
  df_opt REPO_REF --ref "" "Branch, tag or commit to check out after cloning --repo-url."
  df_opt DEEPFLOW_PYTHON --python 3.11 "Python version for the worker venv (installed by uv if missing)."
  df_opt JAX_PIP_SPEC --jax "jax[tpu]" "pip requirement for JAX on TPU, e.g. 'jax[tpu]==0.6.2'."
  df_opt EXTRA_PIP_PACKAGES --pip-extra gcsfs \
    "More pip requirements for the workers, space-separated (gcsfs: gs:// paths without TensorFlow)."
}

df_settings_launch() {
  df_opt EXPERIMENT --experiment "" "Experiment name: runs experiments/NAME.py."
  df_opt CONFIG_FILE --config "" "Experiment file relative to the repo root (instead of --experiment)."
  df_opt BUCKET --bucket "" "GCS bucket (name or gs://name); the workdir defaults to gs://BUCKET/runs/RUN_NAME."
  df_opt WORKDIR --workdir "" "deepflow workdir; must be on GCS (gs://...) for multi-host runs."
  df_opt RUN_NAME --run-name "" "Name for logs and the job on the workers (default: the experiment name)."
  df_switch DISTRIBUTED --distributed 1 "Pass --distributed to deepflow (jax.distributed.initialize); --no-distributed to skip."
  df_list LAUNCH_ENV --env "KEY=VALUE exported on every worker before the command (e.g. LIBTPU_INIT_ARGS=...)."
}

df_settings_job() {
  df_opt RUN_NAME --run-name "" "Name given to launch.sh (default: the experiment name)."
  df_opt EXPERIMENT --experiment "" "Experiment name, used for the default run name."
}

# ---------------------------------------------------------------------------------------------
# Derived values
# ---------------------------------------------------------------------------------------------

# The TPU software version that fits an accelerator type (Cloud TPU's recommendation for JAX).
df_default_runtime_version() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

# Fills defaults that depend on other settings and validates values. Call after df_parse.
df_resolve() {
  QUEUED_RESOURCE="${QUEUED_RESOURCE:-${TPU_NAME:-}}"
  if [[ -n "${ACCELERATOR_TYPE:-}" && -z "${RUNTIME_VERSION:-}" ]]; then
    RUNTIME_VERSION="$(df_default_runtime_version "$ACCELERATOR_TYPE")" ||
      df_die "no default --version for accelerator type '$ACCELERATOR_TYPE'; pass --version"
  fi
  if [[ -n "${CAPACITY:-}" ]]; then
    case "$CAPACITY" in
      on-demand | spot | reserved) ;;
      *) df_die "--capacity must be on-demand, spot or reserved, not '$CAPACITY'" ;;
    esac
  fi
  if [[ -n "${CONFIG_FILE:-}" && -n "${EXPERIMENT:-}" ]]; then
    df_die "give --experiment or --config, not both"
  fi
  if [[ -z "${CONFIG_FILE:-}" && -n "${EXPERIMENT:-}" ]]; then
    CONFIG_FILE="experiments/${EXPERIMENT%.py}.py"
  fi
  if [[ -z "${RUN_NAME:-}" ]]; then
    if [[ -n "${EXPERIMENT:-}" ]]; then
      RUN_NAME="${EXPERIMENT%.py}"
    elif [[ -n "${CONFIG_FILE:-}" ]]; then
      RUN_NAME="$(basename "$CONFIG_FILE" .py)"
    fi
  fi
  if [[ -n "${RUN_NAME:-}" && ! "$RUN_NAME" =~ ^[A-Za-z0-9_.-]+$ ]]; then
    df_die "run name '$RUN_NAME' may only hold letters, digits, '_', '.' and '-'"
  fi
  if [[ -z "${WORKDIR:-}" && -n "${BUCKET:-}" && -n "${RUN_NAME:-}" ]]; then
    local bucket="${BUCKET#gs://}"
    WORKDIR="gs://${bucket%/}/runs/$RUN_NAME"
  fi
  return 0
}

# Checks what a launch needs; call after df_resolve.
df_check_launch() {
  [[ -n "${CONFIG_FILE:-}" ]] || df_die "missing required setting --experiment (or env EXPERIMENT) or --config (or env CONFIG_FILE)"
  [[ -n "${WORKDIR:-}" ]] || df_die "missing required setting --workdir (or env WORKDIR) or --bucket (or env BUCKET)"
  if [[ "$WORKDIR" != gs://* ]]; then
    df_warn "workdir '$WORKDIR' is not on GCS: each worker would write its own local copy"
  fi
  if [[ -z "${REPO_URL:-}" && -n "${SRC_DIR:-}" && ! -f "$SRC_DIR/$CONFIG_FILE" ]]; then
    df_warn "$CONFIG_FILE not found under $SRC_DIR"
  fi
  local kv
  for kv in ${LAUNCH_ENV[@]+"${LAUNCH_ENV[@]}"}; do
    [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || df_die "--env wants KEY=VALUE, got '$kv'"
  done
}

# ---------------------------------------------------------------------------------------------
# gcloud building blocks
# ---------------------------------------------------------------------------------------------

# Flags every tpus command gets: zone and (if set) project.
df_where() {
  DF_WHERE=("--zone=$ZONE")
  if [[ -n "${PROJECT:-}" ]]; then DF_WHERE+=("--project=$PROJECT"); fi
}

# Extra ssh/scp flags (word-split on purpose: they are flags, not paths).
df_ssh_extra() {
  DF_SSH_EXTRA=()
  if [[ -n "${SSH_FLAGS:-}" ]]; then read -r -a DF_SSH_EXTRA <<<"$SSH_FLAGS"; fi
}

# df_ssh WORKER REMOTE_COMMAND: runs one remote shell command on WORKER (a number or 'all').
df_ssh() {
  df_where
  df_ssh_extra
  df_run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${DF_WHERE[@]}" "--worker=$1" \
    ${DF_SSH_EXTRA[@]+"${DF_SSH_EXTRA[@]}"} "--command=$2"
}

df_create() {
  local -a cap=() extra=() auth=()
  case "$CAPACITY" in
    spot) cap=(--spot) ;;
    reserved) cap=(--reserved) ;;
  esac
  if [[ -n "${CREATE_FLAGS:-}" ]]; then read -r -a extra <<<"$CREATE_FLAGS"; fi
  if [[ -n "${SERVICE_ACCOUNT:-}" ]]; then auth+=("--service-account=$SERVICE_ACCOUNT"); fi
  if [[ -n "${SCOPES:-}" ]]; then auth+=("--scopes=$SCOPES"); fi
  df_where
  if [[ "$QUEUED" == 1 ]]; then
    df_run gcloud compute tpus queued-resources create "$QUEUED_RESOURCE" "${DF_WHERE[@]}" \
      "--node-id=$TPU_NAME" "--accelerator-type=$ACCELERATOR_TYPE" \
      "--runtime-version=$RUNTIME_VERSION" ${cap[@]+"${cap[@]}"} \
      ${auth[@]+"${auth[@]}"} ${extra[@]+"${extra[@]}"}
  else
    df_run gcloud compute tpus tpu-vm create "$TPU_NAME" "${DF_WHERE[@]}" \
      "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION" \
      ${cap[@]+"${cap[@]}"} ${auth[@]+"${auth[@]}"} ${extra[@]+"${extra[@]}"}
  fi
}

df_delete() {
  df_where
  if [[ "$QUEUED" == 1 ]]; then
    # --force also deletes the TPU node the queued resource made.
    df_run gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" "${DF_WHERE[@]}" --force --quiet
  else
    df_run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${DF_WHERE[@]}" --quiet
  fi
}

# Prints the resource state: the queued resource's (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...)
# or the node's (READY, CREATING, PREEMPTED, ...); NOT_FOUND if it does not exist; UNKNOWN if
# gcloud failed for another reason (the error goes to stderr). Always returns 0.
df_state() {
  local -a cmd
  local err out rc=0
  df_where
  if [[ "$QUEUED" == 1 ]]; then
    cmd=(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" "${DF_WHERE[@]}" "--format=value(state.state)")
  else
    cmd=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${DF_WHERE[@]}" "--format=value(state)")
  fi
  if [[ "$DRY_RUN" == 1 ]]; then
    df_quote "${cmd[@]}" >&3
    echo "${DF_DRY_STATE:-NOT_FOUND}"
    return 0
  fi
  err="$(mktemp)"
  out="$("${cmd[@]}" 2>"$err")" || rc=$?
  if ((rc == 0)) && [[ -n "$out" ]]; then
    out="${out%%$'\n'*}"
    printf '%s\n' "${out//[[:space:]]/}"
  elif grep -qiE 'NOT_FOUND|not found|does not exist' "$err"; then
    echo NOT_FOUND
  else
    df_warn "could not read the state: $(tr '\n' ' ' <"$err")"
    echo UNKNOWN
  fi
  rm -f "$err"
  return 0
}

# Classifies a state: healthy (job can run), dead (must be recreated) or waiting.
df_state_class() {
  case "$1" in
    READY | ACTIVE) echo healthy ;;
    NOT_FOUND | PREEMPTED | TERMINATED | STOPPED | SUSPENDED | FAILED) echo dead ;;
    *) echo waiting ;;
  esac
}

# Waits until the resource is healthy; returns 1 if it becomes dead. Used after create.
df_wait_healthy() {
  local state last=""
  if [[ "$DRY_RUN" == 1 ]]; then df_state >/dev/null; return 0; fi
  while :; do
    state="$(df_state)"
    if [[ "$state" != "$last" ]]; then df_log "state: $state"; last="$state"; fi
    case "$(df_state_class "$state")" in
      healthy) return 0 ;;
      dead) return 1 ;;
    esac
    sleep "${POLL_SECONDS:-30}"
  done
}

# Checks what an install needs (early, so that babysit fails before creating anything).
df_check_install() {
  if [[ -z "${REPO_URL:-}" && ! -d "$SRC_DIR/deepflow" ]]; then
    df_die "--src '$SRC_DIR' is not a deepflow checkout (no deepflow/ in it); or pass --repo-url"
  fi
}

# Copies (or clones) deepflow onto every worker and installs it with jax[tpu] into ~/deepflow-venv.
df_install() {
  local -a setup=(bash "$DF_REMOTE_DIR/tpu/worker.sh" setup --python "$DEEPFLOW_PYTHON" --jax "$JAX_PIP_SPEC")
  local -a pkgs=()
  local pkg fetch tarball
  if [[ -n "${EXTRA_PIP_PACKAGES:-}" ]]; then read -r -a pkgs <<<"$EXTRA_PIP_PACKAGES"; fi
  for pkg in ${pkgs[@]+"${pkgs[@]}"}; do setup+=(--pip "$pkg"); done
  if [[ -n "$REPO_URL" ]]; then
    fetch="rm -rf $DF_REMOTE_DIR && git clone -q $(df_quote "$REPO_URL") $DF_REMOTE_DIR"
    if [[ -n "$REPO_REF" ]]; then
      fetch="$fetch && git -C $DF_REMOTE_DIR checkout -q $(df_quote "$REPO_REF")"
    fi
  else
    df_check_install
    tarball="${TMPDIR:-/tmp}/deepflow-src-$TPU_NAME.tgz"
    df_run tar -czf "$tarball" --exclude=./.git --exclude=./.venv --exclude=./runs --exclude=./build \
      --exclude=./dist --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache \
      --exclude=.ipynb_checkpoints -C "$SRC_DIR" .
    df_where
    df_ssh_extra
    df_run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:deepflow-src.tgz" "${DF_WHERE[@]}" \
      --worker=all ${DF_SSH_EXTRA[@]+"${DF_SSH_EXTRA[@]}"}
    fetch="rm -rf $DF_REMOTE_DIR && mkdir -p $DF_REMOTE_DIR && tar -xzf deepflow-src.tgz -C $DF_REMOTE_DIR"
  fi
  df_ssh all "set -e; $fetch && $(df_quote "${setup[@]}")"
}

# The remote command launch runs on every worker (also used verbatim by babysit for relaunches).
df_launch_command() {
  local -a cmd=(bash "$DF_REMOTE_DIR/tpu/worker.sh" start "$RUN_NAME")
  local kv
  for kv in ${LAUNCH_ENV[@]+"${LAUNCH_ENV[@]}"}; do cmd+=(--env "$kv"); done
  cmd+=(-- deepflow "${DF_LAUNCH_VERB:-train}" --config "$CONFIG_FILE" --workdir "$WORKDIR")
  if [[ "$DISTRIBUTED" == 1 ]]; then cmd+=(--distributed); fi
  cmd+=(${DF_ARGS[@]+"${DF_ARGS[@]}"})
  df_quote "${cmd[@]}"
}

df_launch() { df_ssh all "$(df_launch_command)"; }

# Prints the job's status on worker 0, as worker.sh reports it: running, exited RC,
# terminated RC (SIGTERM seen: preemption or stop), lost, none (never started), missing (not
# installed); or unreachable if ssh failed. Always returns 0.
df_job_status() {
  local remote out rc=0
  remote="if [ -f $DF_REMOTE_DIR/tpu/worker.sh ]; then bash $DF_REMOTE_DIR/tpu/worker.sh status $(df_quote "$RUN_NAME"); else echo missing; fi"
  if [[ "$DRY_RUN" == 1 ]]; then df_ssh 0 "$remote"; return 0; fi
  out="$(df_ssh 0 "$remote" 2>/dev/null)" || rc=$?
  out="$(printf '%s\n' "$out" | tr -d '\r' | grep -E '^(running|exited|terminated|lost|none|missing)' | tail -n 1)" || true
  if ((rc != 0)) || [[ -z "$out" ]]; then echo unreachable; else printf '%s\n' "$out"; fi
  return 0
}

df_logs() { # df_logs WORKER LINES FOLLOW(0|1)
  local -a cmd=(bash "$DF_REMOTE_DIR/tpu/worker.sh" logs "$RUN_NAME" --lines "$2")
  if [[ "$3" == 1 ]]; then cmd+=(--follow); fi
  df_ssh "$1" "$(df_quote "${cmd[@]}")"
}
