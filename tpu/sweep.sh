#!/usr/bin/env bash
# Starts one `deepflow sweep` worker per host of the slice, all pulling trials from one study.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DF_DESCRIPTION="Start on every worker (--worker=all), detached from ssh (nohup + setsid):
  deepflow sweep --config experiments/NAME.py --workdir gs://BUCKET/runs/NAME \\
      --study NAME --storage URL [ARGS]
Each host is one worker of the study, training on its own chips: it takes a trial, trains it in
WORKDIR/trial_NNN, tells the study, takes the next; a preempted host's trial is retried by another
host from its checkpoint. ARGS (after --) are the sweep's flags (--sweep, --search, --prune,
--trials, ...) and --config.KEY=VALUE overrides. Keep the password out of the URL: pass
--env PGPASSWORD=... . On a multi-host slice, each host's JAX must be told to use its chips
alone (libtpu's --env TPU_PROCESS_BOUNDS=1,1,1 and TPU_CHIPS_PER_PROCESS_BOUNDS=<the host's
chips, e.g. 2,2,1>). Launching again adds the hosts back to the same study."
DF_EXAMPLES="  tpu/sweep.sh --name df-v4 --zone us-central2-b --experiment digits_mlp --bucket my-bucket \\
      --storage postgresql://deepflow@10.0.0.5/studies --env PGPASSWORD=secret -- \\
      --search=tpe --prune=asha --trials=100 '--sweep=optimizer.learning_rate=loguniform(1e-4,1e-2)'"
DF_REQUIRED="TPU_NAME ZONE STORAGE"
DF_TAKES_ARGS=1
df_settings_resource
df_settings_launch
df_opt STORAGE --storage "" "The study's storage, reachable from every host: postgresql://USER@HOST/DB."
df_opt STUDY --study "" "The study's name (default: the run name)."
df_parse "$@"
df_resolve
df_check_launch

DISTRIBUTED=0 # each host is a worker of its own, not one process of a multi-host run
DF_LAUNCH_VERB=sweep
DF_ARGS=(--study "${STUDY:-$RUN_NAME}" --storage "$STORAGE" ${DF_ARGS[@]+"${DF_ARGS[@]}"})
df_launch
