#!/usr/bin/env bash
# logs.sh: show the training log of one worker (or all) of a TPU VM.
#
#   launch/tpu/logs.sh --name dit-pod --zone us-central2-b --follow
#   launch/tpu/logs.sh --name dit-pod --zone us-central2-b --worker 3 --log dit-xl2-256 --lines 500
#
# Options:
#   --name NAME        TPU name (env DIT_JAX_TPU_NAME)                                             [required]
#   --zone ZONE        zone (env DIT_JAX_TPU_ZONE)                                                 [required]
#   --worker K         worker index, or all (default 0: the worker that writes checkpoints and metrics)
#   --log NAME         which run: ~/dit-jax-logs/NAME.log (default: latest, the run train.sh started last)
#   --lines N          lines to show (default 100)
#   --follow           keep following the file (tail -F; Ctrl-C to stop, the run goes on)
#   --project PROJECT  gcloud project (env DIT_JAX_TPU_PROJECT)
#   --dry-run          print the gcloud command instead of running it
#   -h, --help         this help
#
# Read-only and safe to rerun.
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER=0
LOG=latest
LINES=100
FOLLOW=0

normalize_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case $1 in
    --worker) need_value "$@"; WORKER=$2; shift 2 ;;
    --log) need_value "$@"; LOG=$2; shift 2 ;;
    --lines) need_value "$@"; LINES=$2; shift 2 ;;
    --follow) FOLLOW=1; shift ;;
    *) common_option "$@"; shift "$COMMON_SHIFT" ;;
  esac
done
require --name="$TPU_NAME" --zone="$TPU_ZONE"
[[ $WORKER =~ ^([0-9]+|all)$ ]] || usage_error "--worker must be a worker index or all, got '$WORKER'"
[[ $LOG =~ ^[A-Za-z0-9._-]+$ ]] || usage_error "--log must be a plain file name, got '$LOG'"
[[ $LINES =~ ^[0-9]+$ ]] || usage_error "--lines must be a number, got '$LINES'"

TAIL=(tail -n "$LINES")
if ((FOLLOW)); then TAIL+=(-F); fi
ssh_workers "$TPU_NAME" "$WORKER" "$(quote_words "${TAIL[@]}") $REMOTE_LOGS/$LOG.log"
