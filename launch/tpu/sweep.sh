#!/usr/bin/env bash
# sweep.sh: run the paper's sweep (configs/sweeps.py) on one or several TPU VMs.
#
#   launch/tpu/sweep.sh --zone us-central2-b --names dit-a --workdir-root gs://BUCKET/sweeps \
#       -- data.path=/data/imagenet256-latents
#   launch/tpu/sweep.sh --zone us-central2-b --names dit-a,dit-b,dit-c --workdir-root gs://BUCKET/sweeps
#
# Options:
#   --zone ZONE            zone of every TPU (env DIT_JAX_TPU_ZONE)                                [required]
#   --names A[,B,...]      TPU VMs to use (made and set up with create.sh and setup.sh)              [required]
#   --workdir-root DIR     each point trains in DIR/SLUG, e.g. gs://BUCKET/sweeps/dit-xl2-256      [required]
#   --sweep NAME           scaling (default: S/B/L/XL x patch 8/4/2, twelve points), blocks (XL/2 with the
#                          four block designs) or all
#   --res PIXELS           image resolution of the points (default 256)
#   --poll-interval SECONDS
#                          how often a TPU that still runs an earlier job is checked again (default 30)
#   --progress-interval SECONDS
#                          a line from each worker this often while a point runs or is waited for (default 300)
#   --project PROJECT      gcloud project (env DIT_JAX_TPU_PROJECT)
#   --dry-run              print the gcloud commands instead of running them
#   -h, --help             this help
#   -- OVERRIDE ...        config overrides added to every point (key=value or --config.key=value)
#
# The points come from `python -m configs.sweeps --json` (run here with ${PYTHON:-python3}). Point i goes to
# TPU i mod N (round robin); each TPU runs its points one after another, each as train.sh --wait (all
# workers, log ~/dit-jax-logs/SLUG.log, --num-processes = the TPU's workers), and the TPUs run in parallel.
# Before each point one ssh session to all the TPU's workers waits until no run started by train.sh is still
# going there (the pid files in ~/dit-jax-logs, as train.sh's own check): a point whose ssh session dropped
# (counted as failed) may still be training, and the next one must not start beside it. When that check
# itself fails three times (no ssh), the TPU's remaining points are not started and count as failed.
# Exit status 1 if any point failed. Rerunning the sweep resumes: a finished point restores its last
# checkpoint and stops at once, an unfinished one resumes from its newest checkpoint. A dry run prints the
# TPUs' shares one after another.
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NAMES=""
WORKDIR_ROOT=""
SWEEP=scaling
RES=256
POLL=30
PROGRESS=300
EXTRA=()

normalize_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case $1 in
    --names) need_value "$@"; NAMES=$2; shift 2 ;;
    --workdir-root) need_value "$@"; WORKDIR_ROOT=$2; shift 2 ;;
    --sweep) need_value "$@"; SWEEP=$2; shift 2 ;;
    --res) need_value "$@"; RES=$2; shift 2 ;;
    --poll-interval) need_value "$@"; POLL=$2; shift 2 ;;
    --progress-interval) need_value "$@"; PROGRESS=$2; shift 2 ;;
    --name) usage_error "sweep.sh takes --names A[,B,...], not --name" ;;
    --) shift; EXTRA=("$@"); break ;;
    *) common_option "$@"; shift "$COMMON_SHIFT" ;;
  esac
done
require --zone="$TPU_ZONE" --names="$NAMES" --workdir-root="$WORKDIR_ROOT"
case $SWEEP in scaling | blocks | all) ;; *) usage_error "--sweep must be scaling, blocks or all, got '$SWEEP'" ;; esac
[[ $RES =~ ^[0-9]+$ ]] || usage_error "--res must be a number of pixels, got '$RES'"
[[ $POLL =~ ^[1-9][0-9]*$ ]] || usage_error "--poll-interval must be a positive number of seconds, got '$POLL'"
[[ $PROGRESS =~ ^[1-9][0-9]*$ ]] || usage_error "--progress-interval must be a positive number of seconds, got '$PROGRESS'"
IFS=, read -r -a TPUS <<<"$NAMES"
for t in "${TPUS[@]}"; do
  [[ -n $t ]] || usage_error "--names has an empty entry: '$NAMES'"
done
normalize_overrides ${EXTRA[@]+"${EXTRA[@]}"}
WORKDIR_ROOT=${WORKDIR_ROOT%/}

# The points, one per line: SLUG <tab> CONFIG <tab> --config.key=value ...
POINTS_TSV=$(cd "$REPO_ROOT" && "${PYTHON:-python3}" -m configs.sweeps --json --sweep "$SWEEP" --res "$RES" |
  "${PYTHON:-python3}" -c '
import json, sys
for p in json.load(sys.stdin):
    fields = [p["slug"], p["config"]] + [f"--config.{k}={v}" for k, v in p["overrides"].items()]
    if any(c in f for f in fields for c in "\t\n") or not all(fields):
        sys.exit(f"unusable sweep point: {p!r}")
    print("\t".join(fields))
') || die "could not read the sweep points from python -m configs.sweeps (set PYTHON to the project's python)"
mapfile -t POINTS <<<"$POINTS_TSV"
info "${#POINTS[@]} points ($SWEEP sweep) on ${#TPUS[@]} TPU(s): ${TPUS[*]}"

# Check every TPU before starting anything (a missing TPU or a local workdir on a pod fails here, not later).
for t in "${TPUS[@]}"; do
  check_tpu_for_training "$t" "$WORKDIR_ROOT"
done

COMMON_FLAGS=("--zone=$TPU_ZONE")
if [[ -n $TPU_PROJECT ]]; then COMMON_FLAGS+=("--project=$TPU_PROJECT"); fi
if ((DRY_RUN)); then COMMON_FLAGS+=(--dry-run); fi

# wait_idle TPU: returns once no run started by train.sh is going on any worker of TPU (tried three times
# when the ssh session fails); 1 when that could not be checked.
wait_idle() {
  local tpu=$1 try
  for try in 1 2 3; do
    if ssh_workers "$tpu" all "$(idle_remote_command "$POLL" "$PROGRESS")"; then
      return 0
    fi
    info "[$tpu] could not check for a run still going on $tpu (attempt $try of 3)"
    ((try == 3)) || sleep "$POLL"
  done
  return 1
}

# run_share K: the points i with i mod N == K, one after another on TPU K; returns the number that failed.
run_share() {
  local k=$1 tpu=${TPUS[$1]} i failed=0 fields slug config
  for ((i = k; i < ${#POINTS[@]}; i += ${#TPUS[@]})); do
    IFS=$'\t' read -r -a fields <<<"${POINTS[$i]}"
    slug=${fields[0]}
    config=${fields[1]}
    if ! wait_idle "$tpu"; then
      local left=$(((${#POINTS[@]} - i + ${#TPUS[@]} - 1) / ${#TPUS[@]}))
      info "[$tpu] cannot tell whether an earlier run still goes on $tpu (ssh fails): not starting its $left remaining point(s), from $slug on; check it (logs.sh, ssh.sh) and rerun the sweep"
      return $((failed + left))
    fi
    info "[$tpu] point $((i + 1))/${#POINTS[@]}: $slug ($config)"
    if ! "$LAUNCH_DIR/train.sh" --name "$tpu" "${COMMON_FLAGS[@]}" --config "$config" \
      --workdir "$WORKDIR_ROOT/$slug" --log "$slug" --wait --progress-interval "$PROGRESS" \
      -- "${fields[@]:2}" ${OVERRIDES[@]+"${OVERRIDES[@]}"}; then
      info "[$tpu] point $slug FAILED (if its ssh session dropped, it may still be running: the next point on $tpu waits for it)"
      failed=$((failed + 1))
    fi
  done
  return "$failed"
}

FAILED=0
if ((DRY_RUN || ${#TPUS[@]} == 1)); then
  for k in "${!TPUS[@]}"; do
    run_share "$k" || FAILED=$((FAILED + $?))
  done
else
  PIDS=()
  for k in "${!TPUS[@]}"; do
    run_share "$k" &
    PIDS+=("$!")
  done
  for k in "${!PIDS[@]}"; do
    wait "${PIDS[$k]}" || FAILED=$((FAILED + $?))
  done
fi

if ((FAILED)); then
  die "$FAILED point(s) failed (see the messages above and logs.sh --log SLUG); rerun to resume them"
fi
info "all ${#POINTS[@]} points done"
