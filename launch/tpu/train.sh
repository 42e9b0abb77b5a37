#!/usr/bin/env bash
# train.sh: start `dit-jax train` on every worker of a TPU VM at once (--worker=all).
#
#   launch/tpu/train.sh --name dit-pod --zone us-central2-b \
#       --config configs/dit_imagenet.py:variant=XL/2,res=256 --workdir gs://BUCKET/dit-xl2-256 \
#       -- data.path=/data/imagenet256-latents optim.lr=1e-4
#
# Options:
#   --name NAME          TPU name (env DIT_JAX_TPU_NAME)                                           [required]
#   --zone ZONE          zone (env DIT_JAX_TPU_ZONE)                                               [required]
#   --config SPEC        config file and argument, e.g. configs/dit_imagenet.py:variant=XL/2,res=256 [required]
#   --workdir DIR        run folder; gs://BUCKET/... (required on multi-worker slices: every worker writes
#                        checkpoints to the same place, and a worker's own disk goes with the TPU)    [required]
#   --log NAME           log name: ~/dit-jax-logs/NAME.log on each worker (default: the workdir's last part);
#                        ~/dit-jax-logs/latest.log points to it
#   --num-processes N    the slice's number of workers (default: looked up with gcloud; give it only for a dry
#                        run of a TPU that does not exist yet, else it must match the lookup)
#   --wait               stay attached until the run ends and exit with its status (sweep.sh uses this)
#   --progress-interval SECONDS
#                        with --wait: a line from every worker this often, with its log's last line (default
#                        300; 0 = none)
#   --project PROJECT    gcloud project (env DIT_JAX_TPU_PROJECT)
#   --dry-run            print the gcloud command instead of running it
#   -h, --help           this help
#   -- OVERRIDE ...      config overrides: key=value or --config.key=value (both become --config.key=value)
#
# Every worker runs the same `dit-jax train --config SPEC --workdir DIR --num-processes N --config.key=value ...`
# in ~/dit-jax, detached (setsid + nohup), so closing the ssh session does not stop it. N is the slice's number
# of workers (hosts): on a TPU VM, JAX finds the coordinator and each worker's process id by itself, and the
# trainer checks that it joined a job of N processes (it stops with an error instead of training alone on the
# shared workdir). A dry run of a TPU that does not exist (yet) cannot know N: it leaves the flag out (with a
# warning) unless --num-processes is given. Follow the run with logs.sh. The ssh session sends keepalives.
# Idempotent: a worker where a run of the same --log name is still going starts nothing. Rerunning after a
# stop (crash, preemption, teardown + create) resumes from the newest checkpoint in the workdir.
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG=""
WORKDIR=""
LOGNAME_=""
NUM_PROCESSES=""
WAIT=0
PROGRESS=300
EXTRA=()

normalize_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case $1 in
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --log) need_value "$@"; LOGNAME_=$2; shift 2 ;;
    --num-processes) need_value "$@"; NUM_PROCESSES=$2; shift 2 ;;
    --wait) WAIT=1; shift ;;
    --progress-interval) need_value "$@"; PROGRESS=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) common_option "$@"; shift "$COMMON_SHIFT" ;;
  esac
done
require --name="$TPU_NAME" --zone="$TPU_ZONE" --config="$CONFIG" --workdir="$WORKDIR"
LOGNAME_=${LOGNAME_:-$(log_name_for "$WORKDIR")}
[[ $LOGNAME_ =~ ^[A-Za-z0-9._-]+$ && $LOGNAME_ != latest ]] ||
  usage_error "--log must be a plain file name (letters, digits, . _ -), not 'latest': got '$LOGNAME_'"
[[ -z $NUM_PROCESSES || $NUM_PROCESSES =~ ^[1-9][0-9]*$ ]] ||
  usage_error "--num-processes must be a positive number, got '$NUM_PROCESSES'"
[[ $PROGRESS =~ ^[0-9]+$ ]] || usage_error "--progress-interval must be a number of seconds, got '$PROGRESS'"
normalize_overrides ${EXTRA[@]+"${EXTRA[@]}"}

check_tpu_for_training "$TPU_NAME" "$WORKDIR"
if [[ -n $WORKERS ]]; then
  [[ -z $NUM_PROCESSES || $NUM_PROCESSES == "$WORKERS" ]] ||
    usage_error "--num-processes $NUM_PROCESSES does not match TPU $TPU_NAME, which has $WORKERS worker(s) (one process each)"
  NUM_PROCESSES=$WORKERS
elif [[ -z $NUM_PROCESSES ]]; then
  ((DRY_RUN)) || die "cannot tell how many workers TPU $TPU_NAME has; give --num-processes N (its number of hosts)"
  info "warning: the number of workers of $TPU_NAME is unknown, so the command below has no --num-processes (a real run passes the slice's worker count; give --num-processes N to show it)"
fi
TRAIN_ARGS=()
if [[ -n $NUM_PROCESSES ]]; then TRAIN_ARGS+=(--num-processes "$NUM_PROCESSES"); fi

ssh_workers "$TPU_NAME" all "$(train_remote_command "$CONFIG" "$WORKDIR" "$LOGNAME_" "$WAIT" "$PROGRESS" \
  ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"} ${OVERRIDES[@]+"${OVERRIDES[@]}"})"
