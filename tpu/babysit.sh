#!/usr/bin/env bash
# Keeps a deepflow run alive on preemptible TPU capacity until it finishes.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DF_DESCRIPTION="Babysit a run: every --poll-seconds, read the TPU's state and the job's status on
worker 0, and
  * TPU gone (PREEMPTED, SUSPENDED, TERMINATED, FAILED, NOT_FOUND, ...): delete what is left,
    create it again, install deepflow and launch the same command, which resumes from the latest
    checkpoint in the workdir;
  * TPU up, deepflow not installed / job never started: install and/or launch;
  * TPU up, job ended with a non-zero status, or by SIGTERM (deepflow saved and exited 0 on
    preemption or maintenance), or vanished: show the log's tail and launch again;
  * TPU up, job exited 0 on worker 0 (and no SIGTERM): the run is complete; exit 0.
Each recovery after the first start counts as a retry; after --max-retries it exits 1. Stop it
with Ctrl-C at any time: the job keeps running. With --dry-run it prints one recovery cycle."
DF_EXAMPLES="  tpu/babysit.sh --name df-v5e --zone us-west4-a --accelerator-type v5litepod-16 \\
      --queued --capacity spot --experiment mnist_cnn --bucket my-bucket --delete-when-done \\
      -- --config.train.steps=20000"
DF_REQUIRED="TPU_NAME ZONE ACCELERATOR_TYPE"
DF_TAKES_ARGS=1
df_settings_resource
df_settings_create
df_settings_install
df_settings_launch
df_opt MAX_RETRIES --max-retries 10 "Recoveries (recreate or relaunch) allowed before giving up."
df_opt POLL_SECONDS --poll-seconds 60 "Seconds between checks."
df_opt UNREACHABLE_LIMIT --unreachable-limit 10 \
  "Checks in a row that worker 0 may be up but unreachable by ssh before the TPU is recreated."
df_switch DELETE_WHEN_DONE --delete-when-done 0 \
  "Delete the TPU (or queued resource) once the run is complete."
df_parse "$@"
df_resolve
df_check_install
df_check_launch
for n in MAX_RETRIES POLL_SECONDS UNREACHABLE_LIMIT; do
  [[ "${!n}" =~ ^[0-9]+$ ]] || df_die "$n must be a whole number, not '${!n}'"
done

if [[ "$DRY_RUN" == 1 ]]; then
  # One recovery cycle, in order: check, clean up, create, (wait), install, launch, poll.
  df_state >/dev/null
  df_delete
  df_create
  if [[ "$QUEUED" == 1 ]]; then df_state >/dev/null; fi
  df_install
  df_launch
  df_job_status >/dev/null
  exit 0
fi

cycles=0      # times the job was (re)started; the first one is not a retry
fresh=0       # 1 right after (re)creating the TPU: installing there is part of that cycle
unreachable=0 # checks in a row with the TPU up but worker 0 not answering
seen=""

start_cycle() {
  cycles=$((cycles + 1))
  if ((cycles > MAX_RETRIES + 1)); then
    df_fail "gave up after $MAX_RETRIES retries (state $state, job ${job:-?})"
  fi
  if ((cycles > 1)); then df_log "retry $((cycles - 1)) of $MAX_RETRIES"; fi
}

recreate() {
  start_cycle
  if [[ "$state" != NOT_FOUND ]]; then
    df_delete || df_warn "delete failed; trying to create anyway"
  fi
  df_create || df_warn "create failed; will check again"
  fresh=1
  unreachable=0
}

while :; do
  state="$(df_state)"
  job=""
  case "$(df_state_class "$state")" in
    healthy)
      job="$(df_job_status)"
      ;;
  esac
  if [[ "$state/$job" != "$seen" ]]; then
    df_log "state: $state${job:+, job: $job}"
    seen="$state/$job"
  fi
  case "$(df_state_class "$state")/$job" in
    healthy/running)
      if ((cycles == 0)); then cycles=1; fi # attached to a job started before: that was its start
      fresh=0
      unreachable=0
      ;;
    "healthy/exited 0")
      # A preemption can end the job a moment before the TPU's state says so: look once more.
      sleep "$POLL_SECONDS"
      state="$(df_state)"
      if [[ "$(df_state_class "$state")" == healthy ]]; then
        df_log "run complete: the job exited 0 on worker 0 (workdir $WORKDIR)"
        if [[ "$DELETE_WHEN_DONE" == 1 ]]; then df_delete; fi
        exit 0
      fi
      continue
      ;;
    healthy/missing | healthy/none)
      unreachable=0
      if ((!fresh)); then start_cycle; fi
      fresh=0
      if [[ "$job" == missing ]] && ! df_install; then
        df_warn "install failed; will check again"
      else
        df_launch || df_warn "launch failed; will check again"
      fi
      ;;
    healthy/exited* | healthy/terminated* | healthy/lost)
      unreachable=0
      df_log "the job ended ($job); last lines of worker 0's log:"
      df_logs 0 20 0 >&2 || true
      if ((cycles == 0)); then cycles=1; fi # it had been started before babysit came along
      start_cycle
      df_launch || df_warn "launch failed; will check again"
      ;;
    healthy/unreachable)
      unreachable=$((unreachable + 1))
      if ((unreachable >= UNREACHABLE_LIMIT)); then
        df_warn "worker 0 unreachable $unreachable times in a row; recreating the TPU"
        recreate
      fi
      ;;
    dead/*)
      recreate
      ;;
    *) ;; # creating, provisioning, waiting for capacity, deleting, unknown: check again later
  esac
  sleep "$POLL_SECONDS"
done
