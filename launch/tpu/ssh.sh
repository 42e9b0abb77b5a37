#!/usr/bin/env bash
# ssh.sh: an ssh session on one worker of a TPU VM, or a command on one worker or all of them.
#
#   launch/tpu/ssh.sh --name dit-pod --zone us-central2-b                      # interactive, worker 0
#   launch/tpu/ssh.sh --name dit-pod --zone us-central2-b --worker all -- ls -l dit-jax-logs
#   launch/tpu/ssh.sh --name dit-pod --zone us-central2-b --worker all -- 'pkill -f "dit-jax train"'
#
# Options:
#   --name NAME        TPU name (env DIT_JAX_TPU_NAME)                                             [required]
#   --zone ZONE        zone (env DIT_JAX_TPU_ZONE)                                                 [required]
#   --worker K         worker index, a list (1,3), a range (1-3) or all (default 0; a list, a range
#                      and all need a command)
#   --project PROJECT  gcloud project (env DIT_JAX_TPU_PROJECT)
#   --dry-run          print the gcloud command instead of running it
#   -h, --help         this help
#   -- COMMAND ...     run this on the worker(s) (the words joined by spaces, as ssh does) instead of a shell
#
# Multi-worker commands need your key in an agent first: ssh-add ~/.ssh/google_compute_engine
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER=0
COMMAND=()

normalize_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case $1 in
    --worker) need_value "$@"; WORKER=$2; shift 2 ;;
    --) shift; COMMAND=("$@"); break ;;
    *) common_option "$@"; shift "$COMMON_SHIFT" ;;
  esac
done
require --name="$TPU_NAME" --zone="$TPU_ZONE"
[[ $WORKER =~ ^([0-9]+([,-][0-9]+)*|all)$ ]] || usage_error "--worker must be an index, a list, a range or all, got '$WORKER'"

if ((${#COMMAND[@]})); then
  ssh_workers "$TPU_NAME" "$WORKER" "${COMMAND[*]}"
else
  [[ $WORKER =~ ^[0-9]+$ ]] || usage_error "an interactive session needs one --worker index (a command can go to several)"
  run_gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--zone=$TPU_ZONE" "--worker=$WORKER" "${SSH_KEEPALIVE[@]}"
fi
