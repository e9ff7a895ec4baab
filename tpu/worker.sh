#!/usr/bin/env bash
# Runs ON each TPU worker (install.sh, launch.sh, logs.sh and babysit.sh call it over ssh).
#
#   worker.sh setup [--python VER] [--jax SPEC] [--pip REQ]...   venv + pip install -e . + jax[tpu]
#   worker.sh start RUN [--env KEY=VALUE]... -- COMMAND...      start COMMAND in the background
#   worker.sh status RUN     running | exited RC | terminated RC | lost | none | missing
#   worker.sh logs RUN [--lines N] [--follow]                    the job's log, lines prefixed by host
#   worker.sh stop RUN                                           SIGTERM the job (deepflow saves)
#
# A job is one process group started with setsid+nohup, so it outlives the ssh session. When it
# ends, its status file records `exited RC`, or `terminated RC` if the job received SIGTERM
# (preemption or stop): deepflow exits 0 after saving on SIGTERM, and that must not be mistaken
# for a finished run.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO_DIR="$(cd "$DF_TPU_DIR/.." && pwd)"
SELF="$DF_TPU_DIR/$(basename "${BASH_SOURCE[0]}")"
VENV="${DEEPFLOW_VENV:-$HOME/deepflow-venv}"
LOG_DIR="${DEEPFLOW_LOGS:-$HOME/deepflow-logs}"

usage() { sed -n '2,8s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

run_files() {
  [[ "${1:-}" =~ ^[A-Za-z0-9_.-]+$ ]] || df_die "bad or missing run name '${1:-}'"
  RUN="$1"
  LOG="$LOG_DIR/$1.log"
  PIDFILE="$LOG_DIR/$1.pid"
  STATUSFILE="$LOG_DIR/$1.status"
}

# True while the job's supervisor lives. Checks the command line too, so that a pid reused after
# a reboot (or a zombie) does not count as the job.
is_running() {
  local pid
  [[ -f "$PIDFILE" ]] || return 1
  pid="$(cat "$PIDFILE")"
  if [[ -d /proc/$pid ]]; then
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "_supervise $RUN "
  else
    kill -0 "$pid" 2>/dev/null
  fi
}

cmd_setup() {
  local python=3.11 jax="jax[tpu]"
  local -a extra=()
  while (($#)); do
    case "$1" in
      --python) python="$2"; shift 2 ;;
      --jax) jax="$2"; shift 2 ;;
      --pip) extra+=("$2"); shift 2 ;;
      *) df_die "setup: unknown argument '$1'" ;;
    esac
  done
  # Cloud TPU images ship Python 3.10; deepflow needs >= 3.11, so uv provides the interpreter.
  if ! python3 -m uv --version >/dev/null 2>&1; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
      sudo apt-get update -q && sudo apt-get install -y -q python3-pip
    fi
    python3 -m pip install --user -q uv || python3 -m pip install --user -q --break-system-packages uv
  fi
  if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m uv venv --python "$python" "$VENV"
  fi
  python3 -m uv pip install --python "$VENV/bin/python" -U -e "$REPO_DIR" "$jax" ${extra[@]+"${extra[@]}"}
  "$VENV/bin/python" -c 'import deepflow, jax; print("deepflow installed; jax", jax.__version__)'
}

cmd_start() {
  run_files "${1:-}"
  shift
  local kv
  while (($#)); do
    case "$1" in
      --env)
        kv="$2"
        [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || df_die "--env wants KEY=VALUE, got '$kv'"
        export "${kv?}"
        shift 2 ;;
      --) shift; break ;;
      *) df_die "start: unknown argument '$1' (the command goes after --)" ;;
    esac
  done
  (($#)) || df_die "start: no command given after --"
  mkdir -p "$LOG_DIR"
  if is_running; then
    echo "$(hostname): $RUN already running (pid $(cat "$PIDFILE")); not starting another" >&2
    exit 1
  fi
  rm -f "$STATUSFILE"
  cd "$REPO_DIR"
  if [[ -d "$VENV/bin" ]]; then export PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV"; fi
  export PYTHONUNBUFFERED=1
  printf '=== %s %s: %s\n' "$(date -u +%FT%TZ)" "$(hostname)" "$(df_quote "$@")" >>"$LOG"
  nohup setsid bash "$SELF" _supervise "$RUN" "$@" >>"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  echo "$(hostname): started $RUN (pid $!), log $LOG"
}

# Runs the command in the foreground of this (setsid) process group and records how it ended.
cmd_supervise() {
  run_files "$1"
  shift
  local term=0 rc=0
  # SIGTERM reaches the whole group (shutdown on preemption, or `stop`); deepflow gets its own
  # copy and saves; here we only remember that it happened. The command runs in the foreground,
  # so bash defers the trap until it exits and $? is the command's own status.
  trap 'term=1' TERM
  "$@" || rc=$?
  if ((term)); then
    echo "terminated $rc" >"$STATUSFILE.tmp"
  else
    echo "exited $rc" >"$STATUSFILE.tmp"
  fi
  mv "$STATUSFILE.tmp" "$STATUSFILE"
  printf '=== %s %s: %s\n' "$(date -u +%FT%TZ)" "$(hostname)" "$(cat "$STATUSFILE")"
}

cmd_status() {
  run_files "${1:-}"
  if is_running; then
    echo running
  elif [[ -f "$STATUSFILE" ]]; then
    cat "$STATUSFILE"
  elif [[ -f "$PIDFILE" ]]; then
    echo lost # started, but died without a status (killed -9, VM restarted)
  elif [[ ! -x "$VENV/bin/python" ]]; then
    echo missing # not installed (or only half)
  else
    echo none
  fi
}

cmd_logs() {
  run_files "${1:-}"
  shift
  local lines=100 follow=0 host
  while (($#)); do
    case "$1" in
      --lines) lines="$2"; shift 2 ;;
      --follow) follow=1; shift ;;
      *) df_die "logs: unknown argument '$1'" ;;
    esac
  done
  host="$(hostname)"
  [[ -f "$LOG" ]] || { echo "[$host] no log yet at $LOG"; ((follow)) || return 0; }
  if ((follow)); then
    tail -n "$lines" -F "$LOG" 2>/dev/null | sed -u "s/^/[$host] /"
  else
    tail -n "$lines" "$LOG" | sed "s/^/[$host] /"
  fi
}

cmd_stop() {
  run_files "${1:-}"
  if is_running; then
    kill -TERM -- "-$(cat "$PIDFILE")"
    echo "$(hostname): sent SIGTERM to $RUN"
  else
    echo "$(hostname): $RUN is not running"
  fi
}

RUN=""
case "${1:-}" in
  setup) shift; cmd_setup "$@" ;;
  start) shift; cmd_start "$@" ;;
  _supervise) shift; cmd_supervise "$@" ;;
  status) shift; cmd_status "$@" ;;
  logs) shift; cmd_logs "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  -h | --help) usage ;;
  *) usage >&2; exit 2 ;;
esac
