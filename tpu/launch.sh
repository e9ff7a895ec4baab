#!/usr/bin/env bash
# Starts the same deepflow train command on every worker, in the background, logging to a file.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DF_DESCRIPTION="Start on every worker (--worker=all), detached from ssh (nohup + setsid):
  deepflow train --config experiments/NAME.py --workdir gs://BUCKET/runs/NAME --distributed [ARGS]
ARGS are --config.KEY=VALUE overrides and anything after --. Each worker logs to
~/deepflow-logs/RUN_NAME.log (see tpu/logs.sh). Launching again on the same workdir resumes from
the latest checkpoint. --follow streams worker 0's log afterwards."
DF_EXAMPLES="  tpu/launch.sh --name df-v4 --zone us-central2-b --experiment mnist_cnn --bucket my-bucket \\
      --config.train.steps=2000 --config.train.compute_dtype=bfloat16 --follow"
DF_REQUIRED="TPU_NAME ZONE"
DF_TAKES_ARGS=1
df_settings_resource
df_settings_launch
df_opt SRC_DIR --src "$(cd "$DF_TPU_DIR/.." && pwd)" "Local checkout, only used to check that the config file exists."
df_switch FOLLOW --follow 0 "After launching, stream worker 0's log (Ctrl-C stops streaming, not the job)."
df_parse "$@"
df_resolve
df_check_launch

df_launch
if [[ "$FOLLOW" == 1 ]]; then df_logs 0 100 1; fi
