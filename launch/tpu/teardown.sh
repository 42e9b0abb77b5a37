#!/usr/bin/env bash
# teardown.sh: delete a TPU VM, or the queued resource that holds it.
#
#   launch/tpu/teardown.sh --name dit-pod --zone us-central2-b
#   launch/tpu/teardown.sh --name dit-v5e --zone us-west4-a --queued --dry-run
#
# Options:
#   --name NAME        TPU name (env DIT_JAX_TPU_NAME)                                             [required]
#   --zone ZONE        zone (env DIT_JAX_TPU_ZONE)                                                 [required]
#   --queued           only look for a queued resource NAME (default: a queued resource NAME first, then a
#                      TPU VM NAME)
#   --project PROJECT  gcloud project (env DIT_JAX_TPU_PROJECT)
#   --dry-run          print the gcloud command instead of running it
#   -h, --help         this help
#
# A queued resource is deleted with --force (its TPU VM goes with it); a TPU VM with tpu-vm delete. Both
# without a prompt (--quiet). Idempotent: nothing of that name = nothing to do, exit status 0.
# The workdir on GCS is kept (checkpoints, metrics); the workers' disks (logs, the virtualenv) are not.
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=0

normalize_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case $1 in
    --queued) QUEUED=1; shift ;;
    *) common_option "$@"; shift "$COMMON_SHIFT" ;;
  esac
done
require --name="$TPU_NAME" --zone="$TPU_ZONE"

if queued_exists "$TPU_NAME"; then
  info "deleting queued resource $TPU_NAME ($QUEUED_STATE) and its TPU VM"
  run_gcloud compute tpus queued-resources delete "$TPU_NAME" "--zone=$TPU_ZONE" --force --quiet
elif ((!QUEUED)) && tpu_exists "$TPU_NAME"; then
  info "deleting TPU VM $TPU_NAME ($TPU_STATE)"
  run_gcloud compute tpus tpu-vm delete "$TPU_NAME" "--zone=$TPU_ZONE" --quiet
else
  info "no $( ((QUEUED)) && echo "queued resource" || echo "queued resource or TPU VM") named $TPU_NAME in $TPU_ZONE: nothing to do"
fi
