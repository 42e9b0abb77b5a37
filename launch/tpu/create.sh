#!/usr/bin/env bash
# create.sh: create a Cloud TPU VM (directly, or through a queued resource) unless it already exists.
#
#   launch/tpu/create.sh --name dit-pod --zone us-central2-b --accelerator-type v4-32
#   launch/tpu/create.sh --name dit-v3 --zone europe-west4-a --accelerator-type v3-256 --spot
#   launch/tpu/create.sh --name dit-v5e --zone us-west4-a --accelerator-type v5e-256 --queued --dry-run
#
# Zones offer some generations only (cloud.google.com/tpu/docs/regions-zones), e.g. v3 pods europe-west4-a and
# us-central1-a; v4 us-central2-b; v5e us-west4-a, us-east5-b, europe-west4-b; v5p us-east5-a.
#
# Options:
#   --name NAME              TPU name (env DIT_JAX_TPU_NAME)                                    [required]
#   --zone ZONE              zone (env DIT_JAX_TPU_ZONE)                                        [required]
#   --accelerator-type TYPE  v2-8, v3-256, v4-8, v5e-256 (= gcloud's v5litepod-256), v5p-128, v6e-8 [required]
#   --runtime-version RV     TPU software version; default by generation: v2/v3/v4 tpu-ubuntu2204-base,
#                            v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
#   --queued                 create a queued resource (id NAME, node id NAME) and wait until it is ACTIVE
#   --spot                   spot capacity (cheaper, can be preempted)
#   --reserved               use the project's reservation
#   --wait-timeout SECONDS   queued: give up waiting after this long (default 3600; 0 = do not wait)
#   --poll-interval SECONDS  queued: time between state checks (default 30)
#   --project PROJECT        gcloud project (env DIT_JAX_TPU_PROJECT; default: gcloud's configured one)
#   --dry-run                print the gcloud commands that would change something instead of running them
#   -h, --help               this help
#
# Idempotent: an existing TPU VM (or queued resource) of that name is left alone; for a queued resource
# the script then only waits for it to become ACTIVE, so rerunning it after a timeout keeps waiting.
# An existing TPU VM that is not READY: on its way (CREATING, STARTING, REPAIRING, ...) exit status 0, to
# wait for; STOPPED: exit status 1 and the `gcloud compute tpus tpu-vm start` command to run; PREEMPTED or
# TERMINATED (spot and preemptible TPUs end so, and cannot be restarted), DELETING, HIDDEN: exit status 1, to
# delete it (teardown.sh) and create it again. The same for a queued resource that is FAILED or SUSPENDED.
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCEL=""
RUNTIME=""
QUEUED=0
SPOT=0
RESERVED=0
WAIT_TIMEOUT=3600
POLL_INTERVAL=30

normalize_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case $1 in
    --accelerator-type) need_value "$@"; ACCEL=$2; shift 2 ;;
    --runtime-version) need_value "$@"; RUNTIME=$2; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --reserved) RESERVED=1; shift ;;
    --wait-timeout) need_value "$@"; WAIT_TIMEOUT=$2; shift 2 ;;
    --poll-interval) need_value "$@"; POLL_INTERVAL=$2; shift 2 ;;
    *) common_option "$@"; shift "$COMMON_SHIFT" ;;
  esac
done
require --name="$TPU_NAME" --zone="$TPU_ZONE" --accelerator-type="$ACCEL"
[[ $WAIT_TIMEOUT =~ ^[0-9]+$ ]] || usage_error "--wait-timeout must be a number of seconds, got '$WAIT_TIMEOUT'"
[[ $POLL_INTERVAL =~ ^[1-9][0-9]*$ ]] || usage_error "--poll-interval must be a positive number of seconds, got '$POLL_INTERVAL'"

# The user-facing name (v5e-256) -> gcloud's accelerator type (v5litepod-256).
case $ACCEL in
  v5e-*) GCLOUD_ACCEL=v5litepod-${ACCEL#v5e-} ;;
  *) GCLOUD_ACCEL=$ACCEL ;;
esac
[[ $GCLOUD_ACCEL =~ ^(v2|v3|v4|v5litepod|v5p|v6e)-[0-9]+$ ]] ||
  usage_error "unknown --accelerator-type '$ACCEL' (expected e.g. v3-256, v4-8, v5e-256, v5p-128, v6e-8)"

# Google's recommended software versions for JAX (cloud.google.com/tpu/docs/runtimes).
if [[ -z $RUNTIME ]]; then
  case $GCLOUD_ACCEL in
    v2-* | v3-* | v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    v5litepod-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
  esac
  info "runtime version $RUNTIME (the default for $GCLOUD_ACCEL)"
fi

FLAGS=("--accelerator-type=$GCLOUD_ACCEL")
if ((SPOT)); then FLAGS+=(--spot); fi
if ((RESERVED)); then FLAGS+=(--reserved); fi

# queued: poll until ACTIVE (or FAILED/SUSPENDED, or the timeout)
wait_until_active() {
  if ((DRY_RUN)); then
    info "dry run: would wait (up to ${WAIT_TIMEOUT}s) for queued resource $TPU_NAME to become ACTIVE"
    return 0
  fi
  if ((WAIT_TIMEOUT == 0)); then
    info "not waiting; check with: gcloud compute tpus queued-resources describe $TPU_NAME --zone=$TPU_ZONE"
    return 0
  fi
  local start=$SECONDS state=""
  while :; do
    if queued_exists "$TPU_NAME"; then state=$QUEUED_STATE; else state=ABSENT; fi
    case $state in
      ACTIVE) info "queued resource $TPU_NAME is ACTIVE: TPU VM $TPU_NAME is ready"; return 0 ;;
      FAILED | SUSPENDED | SUSPENDING | ABSENT)
        die "queued resource $TPU_NAME is $state; delete it (teardown.sh) and create it again" ;;
      DELETING) die "queued resource $TPU_NAME is DELETING: rerun create.sh once it is gone" ;;
    esac
    if ((SECONDS - start >= WAIT_TIMEOUT)); then
      die "queued resource $TPU_NAME is still $state after ${WAIT_TIMEOUT}s; rerun create.sh to keep waiting"
    fi
    info "queued resource $TPU_NAME is $state; checking again in ${POLL_INTERVAL}s"
    sleep "$POLL_INTERVAL"
  done
}

# existing_tpu_vm WHAT: the TPU VM $TPU_NAME exists (in TPU_STATE); say what it is good for and exit: 0 when it
# is READY or on its way there, 1 when the user must act (start it, or delete and recreate it).
existing_tpu_vm() {
  local rc=0
  tpu_state_advice "$TPU_NAME" "$TPU_STATE" || rc=$?
  case $rc in
    0) info "TPU VM $TPU_NAME already exists in $TPU_ZONE ($TPU_STATE)$1: nothing to do" ;;
    1) info "TPU VM $TPU_NAME already exists in $TPU_ZONE$1, not creating it again; $ADVICE" ;;
    *) die "$ADVICE" ;;
  esac
  exit 0
}

if ((QUEUED)); then
  if queued_exists "$TPU_NAME"; then
    info "queued resource $TPU_NAME already exists in $TPU_ZONE ($QUEUED_STATE): not creating it again"
  elif tpu_exists "$TPU_NAME"; then
    existing_tpu_vm ", not as a queued resource"
  else
    run_gcloud compute tpus queued-resources create "$TPU_NAME" "--zone=$TPU_ZONE" "--node-id=$TPU_NAME" \
      "${FLAGS[@]}" "--runtime-version=$RUNTIME"
  fi
  wait_until_active
else
  if tpu_exists "$TPU_NAME"; then
    existing_tpu_vm ""
  fi
  run_gcloud compute tpus tpu-vm create "$TPU_NAME" "--zone=$TPU_ZONE" "${FLAGS[@]}" "--version=$RUNTIME"
fi
