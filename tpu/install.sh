#!/usr/bin/env bash
# Installs deepflow (pip install -e) and jax[tpu] on every worker of a TPU slice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DF_DESCRIPTION="Put deepflow on every worker (--worker=all) and install it: either copy this
checkout (a tarball without .git, .venv and runs/, sent with tpu-vm scp) or git clone --repo-url
on each worker; then, on each worker, tpu/worker.sh setup makes ~/deepflow-venv (Python from uv)
and runs pip install -e ~/deepflow plus jax[tpu]."
DF_EXAMPLES="  tpu/install.sh --name df-v4 --zone us-central2-b
  tpu/install.sh --name df-v4 --zone us-central2-b --repo-url https://github.com/ORG/deepflow --ref main"
DF_REQUIRED="TPU_NAME ZONE"
df_settings_resource
df_settings_install
df_parse "$@"
df_resolve

df_install
