#!/usr/bin/env bash
# Prints the resource state and, if it is up, the job's status on worker 0.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DF_DESCRIPTION="Print two lines: 'state: STATE' (READY/ACTIVE, CREATING, WAITING_FOR_RESOURCES,
PREEMPTED, SUSPENDED, NOT_FOUND, ...) and, when the TPU is up and a run name is known,
'job: STATUS' on worker 0 (running, exited RC, terminated RC, lost, none, missing, unreachable)."
DF_EXAMPLES="  tpu/status.sh --name df-v4 --zone us-central2-b --experiment mnist_cnn"
DF_REQUIRED="TPU_NAME ZONE"
df_settings_resource
df_settings_job
df_parse "$@"
df_resolve

state="$(df_state)"
[[ "$DRY_RUN" == 1 ]] || echo "state: $state"
if [[ -n "$RUN_NAME" && ( "$DRY_RUN" == 1 || "$(df_state_class "$state")" == healthy ) ]]; then
  job="$(df_job_status)"
  [[ "$DRY_RUN" == 1 ]] || echo "job: $job"
fi
