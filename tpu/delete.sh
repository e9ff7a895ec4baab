#!/usr/bin/env bash
# Deletes the TPU VM, or the queued resource together with the TPU it made.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DF_DESCRIPTION="Delete the TPU VM (tpu-vm delete), or with --queued the queued resource and its
TPU (queued-resources delete --force). Checkpoints and logs in GCS are kept."
DF_EXAMPLES="  tpu/delete.sh --name df-v4 --zone us-central2-b
  tpu/delete.sh --name df-v6e --zone us-east1-d --queued"
DF_REQUIRED="TPU_NAME ZONE"
df_settings_resource
df_parse "$@"
df_resolve

df_delete
