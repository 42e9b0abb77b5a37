#!/usr/bin/env bash
# train.sh: start `dit-jax train` on every worker of a TPU VM at once (--worker=all).
#
#   launch/tpu/train.sh --name dit-pod --zone us-east1-d \
#       --config configs/dit_imagenet.py:variant=XL/2,res=256 --workdir gs://BUCKET/dit-xl2-256 \
#       -- data.path=/data/imagenet256-latents optim.lr=1e-4
#
# Options:
#   --name NAME        TPU name (env DIT_JAX_TPU_NAME)                                             [required]
#   --zone ZONE        zone (env DIT_JAX_TPU_ZONE)                                                 [required]
#   --config SPEC      config file and argument, e.g. configs/dit_imagenet.py:variant=XL/2,res=256  [required]
#   --workdir DIR      run folder; gs://BUCKET/... (required on multi-worker slices: every worker writes
#                      checkpoints to the same place, and a worker's own disk goes with the TPU)      [required]
#   --log NAME         log name: ~/dit-jax-logs/NAME.log on each worker (default: the workdir's last part);
#                      ~/dit-jax-logs/latest.log points to it
#   --wait             stay attached until the run ends and exit with its status (sweep.sh uses this)
#   --project PROJECT  gcloud project (env DIT_JAX_TPU_PROJECT)
#   --dry-run          print the gcloud command instead of running it
#   -h, --help         this help
#   -- OVERRIDE ...    config overrides: key=value or --config.key=value (both become --config.key=value)
#
# Every worker runs the same `dit-jax train --config SPEC --workdir DIR --config.key=value ...` in ~/dit-jax,
# detached (setsid + nohup), so closing the ssh session does not stop it; on a multi-host slice the trainer
# calls jax.distributed.initialize() and the workers form one job. Follow it with logs.sh.
# Idempotent: a worker where a run of the same --log name is still going starts nothing. Rerunning after a
# stop (crash, preemption, teardown + create) resumes from the newest checkpoint in the workdir.
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG=""
WORKDIR=""
LOGNAME_=""
WAIT=0
EXTRA=()

normalize_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case $1 in
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --log) need_value "$@"; LOGNAME_=$2; shift 2 ;;
    --wait) WAIT=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) common_option "$@"; shift "$COMMON_SHIFT" ;;
  esac
done
require --name="$TPU_NAME" --zone="$TPU_ZONE" --config="$CONFIG" --workdir="$WORKDIR"
LOGNAME_=${LOGNAME_:-$(log_name_for "$WORKDIR")}
[[ $LOGNAME_ =~ ^[A-Za-z0-9._-]+$ && $LOGNAME_ != latest ]] ||
  usage_error "--log must be a plain file name (letters, digits, . _ -), not 'latest': got '$LOGNAME_'"
normalize_overrides ${EXTRA[@]+"${EXTRA[@]}"}

check_workdir "$TPU_NAME" "$WORKDIR"
ssh_workers "$TPU_NAME" all \
  "$(train_remote_command "$CONFIG" "$WORKDIR" "$LOGNAME_" "$WAIT" ${OVERRIDES[@]+"${OVERRIDES[@]}"})"
