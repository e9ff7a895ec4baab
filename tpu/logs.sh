#!/usr/bin/env bash
# Shows or streams a job's log from one worker or all of them.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DF_DESCRIPTION="Print the last lines of ~/deepflow-logs/RUN_NAME.log on a worker (default 0, or
'all'), each line prefixed with the worker's hostname; --follow keeps streaming (tail -F) until
Ctrl-C. Metrics also land in WORKDIR/metrics.jsonl and TensorBoard files in GCS."
DF_EXAMPLES="  tpu/logs.sh --name df-v4 --zone us-central2-b --experiment mnist_cnn --follow
  tpu/logs.sh --name df-v4 --zone us-central2-b --run-name mnist_cnn --worker all --lines 20"
DF_REQUIRED="TPU_NAME ZONE"
df_settings_resource
df_settings_job
df_opt WORKER --worker 0 "Worker index, or 'all'."
df_opt LOG_LINES --lines 100 "How many past lines to show."
df_switch FOLLOW --follow 0 "Keep streaming new lines."
df_parse "$@"
df_resolve
[[ -n "$RUN_NAME" ]] || df_die "missing required setting --run-name (or env RUN_NAME) or --experiment (or env EXPERIMENT)"
[[ "$WORKER" =~ ^([0-9]+|all)$ ]] || df_die "--worker must be a number or 'all', not '$WORKER'"
[[ "$LOG_LINES" =~ ^[0-9]+$ ]] || df_die "--lines must be a number, not '$LOG_LINES'"

df_logs "$WORKER" "$LOG_LINES" "$FOLLOW"
