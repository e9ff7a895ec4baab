#!/usr/bin/env bash
# Creates a Cloud TPU VM slice (tpu-vm create) or asks for one through a queued resource.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DF_DESCRIPTION="Create a TPU VM slice: on-demand, spot or reserved; directly (tpu-vm create) or
through a queued resource (--queued), which waits in line for capacity. With --queued this
script waits until the queued resource is ACTIVE (--no-wait to return at once)."
DF_EXAMPLES="  tpu/create.sh --name df-v4 --zone us-central2-b --accelerator-type v4-32 --capacity spot
  TPU_NAME=df-v6e ZONE=us-east1-d ACCELERATOR_TYPE=v6e-8 tpu/create.sh --queued --capacity spot"
DF_REQUIRED="TPU_NAME ZONE ACCELERATOR_TYPE"
df_settings_resource
df_settings_create
df_switch WAIT --wait 1 "With --queued: wait until the queued resource is ACTIVE."
df_opt POLL_SECONDS --poll-seconds 30 "Seconds between state checks while waiting."
df_parse "$@"
df_resolve

df_create
if [[ "$QUEUED" == 1 && "$WAIT" == 1 ]]; then
  df_wait_healthy || df_fail "queued resource $QUEUED_RESOURCE ended in state $(df_state)"
fi
