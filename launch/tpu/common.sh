# shellcheck shell=bash
# shellcheck disable=SC2034  # the variables set here are read by the scripts that source this file
# common.sh: sourced by every launch/tpu script (not run on its own).
#
# Provides option parsing (--name, --zone, --project, --dry-run, -h/--help), the gcloud wrappers and the
# remote layout shared by the scripts.
#
# Dry run: every command that would change something (create, delete, ssh, scp) is printed on stdout, one
# line each, exactly as it would be run: `gcloud ARG ...` with each argument shell-quoted (copy-pasteable,
# and `shlex.split` gives the argv back). Read-only look-ups (`describe`) still run, so a dry run shows what
# a real run would do given the current state of the project. Everything else goes to stderr.
#
# Exit status: 0 done (or nothing to do), 1 failure, 2 bad usage (unknown or missing options).
#
# Environment defaults (flags win): DIT_JAX_TPU_NAME, DIT_JAX_TPU_ZONE, DIT_JAX_TPU_PROJECT.

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$LAUNCH_DIR/../.." && pwd)
SCRIPT_NAME=$(basename "$0")

TPU_NAME=${DIT_JAX_TPU_NAME:-}
TPU_ZONE=${DIT_JAX_TPU_ZONE:-}
TPU_PROJECT=${DIT_JAX_TPU_PROJECT:-}
DRY_RUN=0

# Layout on every worker. Literal $HOME: expanded by the worker's shell, never here.
# shellcheck disable=SC2016
REMOTE_DIR='"$HOME/dit-jax"'          # the package source (clone or copy)
# shellcheck disable=SC2016
REMOTE_VENV='"$HOME/dit-jax-venv"'    # Python 3.11 virtualenv with jax[tpu] and the package
# shellcheck disable=SC2016
REMOTE_LOGS='"$HOME/dit-jax-logs"'    # one NAME.log (+ .pid, .rc) per run, on each worker's own disk

# ------------------------------------------------------------------ messages and usage

info() { printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2; }
die() { printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2; exit 1; }
usage_error() { printf '%s: error: %s (see %s --help)\n' "$SCRIPT_NAME" "$*" "$SCRIPT_NAME" >&2; exit 2; }

# The script's header comment (from line 2 to the first line that is not a comment), without the "# ".
usage() {
  local line
  while IFS= read -r line; do
    case $line in
      '#!'*) continue ;;
      '#'*) line=${line#\#}; printf '%s\n' "${line# }" ;;
      *) break ;;
    esac
  done <"$0"
}

# ------------------------------------------------------------------ option parsing

# normalize_args "$@": split --opt=value into --opt value (up to a "--"); the result is in ARGS.
normalize_args() {
  ARGS=()
  while (($#)); do
    if [[ $1 == -- ]]; then
      ARGS+=("$@")
      return
    fi
    if [[ $1 =~ ^--[A-Za-z0-9-]+= ]]; then
      ARGS+=("${1%%=*}" "${1#*=}")
    else
      ARGS+=("$1")
    fi
    shift
  done
}

# need_value "$@": the option in $1 takes a value.
need_value() {
  if (($# < 2)) || [[ -z $2 || $2 == --* ]]; then
    usage_error "option $1 needs a value"
  fi
}

# common_option "$@": handle one of the shared options; sets COMMON_SHIFT. Exits 2 on anything else.
common_option() {
  case $1 in
    --name) need_value "$@"; TPU_NAME=$2; COMMON_SHIFT=2 ;;
    --zone) need_value "$@"; TPU_ZONE=$2; COMMON_SHIFT=2 ;;
    --project) need_value "$@"; TPU_PROJECT=$2; COMMON_SHIFT=2 ;;
    --dry-run) DRY_RUN=1; COMMON_SHIFT=1 ;;
    -h | --help) usage; exit 0 ;;
    -*) usage_error "unknown option $1" ;;
    *) usage_error "unexpected argument '$1'" ;;
  esac
}

# require OPTION=VALUE ...: every value must be set; names all missing ones at once.
require() {
  local pair missing=()
  for pair in "$@"; do
    [[ -n ${pair#*=} ]] || missing+=("${pair%%=*}")
  done
  ((${#missing[@]} == 0)) || usage_error "missing required option(s): ${missing[*]}"
}

# ------------------------------------------------------------------ quoting

# shquote WORD: WORD quoted for a POSIX shell (as Python's shlex.quote does).
shquote() {
  local s=$1 q="'\\''"
  if [[ $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/$q}"
  fi
}

# quote_words WORD ...: the words quoted and joined by spaces.
quote_words() {
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(shquote "$w")"
  done
  printf '%s' "$out"
}

# ------------------------------------------------------------------ gcloud

# gcloud-wide flags added to every call
gcloud_global_flags() {
  GLOBAL_FLAGS=()
  if [[ -n $TPU_PROJECT ]]; then GLOBAL_FLAGS+=("--project=$TPU_PROJECT"); fi
}

# run_gcloud ARG ...: a call that changes something. Dry run: print it; otherwise run it.
run_gcloud() {
  gcloud_global_flags
  if ((DRY_RUN)); then
    printf 'gcloud %s\n' "$(quote_words "$@" ${GLOBAL_FLAGS[@]+"${GLOBAL_FLAGS[@]}"})"
  else
    gcloud "$@" ${GLOBAL_FLAGS[@]+"${GLOBAL_FLAGS[@]}"}
  fi
}

# read_gcloud ARG ...: a read-only call (describe); runs in dry-run mode too.
read_gcloud() {
  gcloud_global_flags
  gcloud "$@" ${GLOBAL_FLAGS[@]+"${GLOBAL_FLAGS[@]}"}
}

# describe_value KIND NAME FORMAT: one field of the TPU VM (KIND=tpu-vm) or queued resource
# (KIND=queued-resources) NAME in $TPU_ZONE, in DESCRIBED. Returns 1 when it does not exist; exits 1 on any
# other error (no credentials, no network, wrong project), so "absent" is never guessed.
describe_value() {
  local kind=$1 name=$2 format=$3 out err rc=0
  out=$(mktemp)
  err=$(mktemp)
  read_gcloud compute tpus "$kind" describe "$name" "--zone=$TPU_ZONE" "--format=$format" >"$out" 2>"$err" || rc=$?
  DESCRIBED=$(<"$out")
  if ((rc != 0)) && ! grep -qiE 'NOT_FOUND|not found' "$err"; then
    cat "$err" >&2
    rm -f "$out" "$err"
    die "gcloud compute tpus $kind describe $name failed (exit $rc)"
  fi
  rm -f "$out" "$err"
  return $((rc != 0))
}

# tpu_exists NAME: 0 when the TPU VM exists; its state (READY, CREATING, ...) is in TPU_STATE.
tpu_exists() {
  describe_value tpu-vm "$1" 'value(state)' || return 1
  TPU_STATE=$DESCRIBED
}

# queued_exists NAME: 0 when the queued resource exists; its state (ACTIVE, WAITING_FOR_RESOURCES, ...) is
# in QUEUED_STATE.
queued_exists() {
  describe_value queued-resources "$1" 'value(state.state)' || return 1
  QUEUED_STATE=$DESCRIBED
}

# tpu_info NAME: 0 when the TPU VM exists; its state is in TPU_STATE and its number of workers (hosts, one
# network endpoint each) in TPU_WORKERS: a positive number, or empty when it has none yet (CREATING, ...).
tpu_info() {
  local fields
  describe_value tpu-vm "$1" 'value(state,networkEndpoints.len())' || return 1
  read -r -a fields <<<"$DESCRIBED"
  TPU_STATE=${fields[0]:-}
  TPU_WORKERS=${fields[1]:-}
  [[ $TPU_WORKERS =~ ^[1-9][0-9]*$ ]] || TPU_WORKERS=""
}

# tpu_state_advice NAME STATE: what a TPU VM in STATE is good for, in ADVICE (one sentence that ends in what to
# do; a gcloud command in it comes last, after a colon). Returns 0 when it is usable (READY), 1 when it is on
# its way to READY (wait), 2 otherwise (the user must act: start it, or delete and recreate it).
# States: cloud.google.com/tpu/docs/reference/rest/v2/projects.locations.nodes#State
tpu_state_advice() {
  local name=$1 state=$2 where="--zone=$TPU_ZONE${TPU_PROJECT:+ --project=$TPU_PROJECT}"
  case $state in
    READY)
      ADVICE="TPU VM $name is READY"
      return 0 ;;
    CREATING | STARTING | RESTARTING | REPAIRING | UNHIDING)
      ADVICE="TPU VM $name is $state: wait until it is READY; check with: gcloud compute tpus tpu-vm describe $name $where --format='value(state)'"
      return 1 ;;
    STOPPING)
      ADVICE="TPU VM $name is STOPPING: once it is STOPPED, start it with: gcloud compute tpus tpu-vm start $name $where"
      return 2 ;;
    STOPPED)
      ADVICE="TPU VM $name is STOPPED: start it with: gcloud compute tpus tpu-vm start $name $where"
      return 2 ;;
    PREEMPTED | TERMINATED)
      ADVICE="TPU VM $name is $state: a $(tr '[:upper:]' '[:lower:]' <<<"$state") TPU VM cannot be restarted; delete it (teardown.sh) and create it again (create.sh, setup.sh; train.sh then resumes from the workdir's newest checkpoint)"
      return 2 ;;
    DELETING)
      ADVICE="TPU VM $name is DELETING: rerun create.sh once it is gone"
      return 2 ;;
    HIDING | HIDDEN)
      ADVICE="TPU VM $name is $state and cannot be used; delete it (teardown.sh) and create it again (create.sh)"
      return 2 ;;
    *)
      ADVICE="TPU VM $name is in state '$state', which these scripts do not know; look at it with: gcloud compute tpus tpu-vm describe $name $where"
      return 2 ;;
  esac
}

# Keepalive for every ssh session (gcloud splits each --ssh-flag on spaces): a long silent session, such as
# train.sh --wait or setup.sh's pip install, is not dropped by an idle-connection timeout on the way, and a
# dead connection is noticed after ServerAliveInterval x ServerAliveCountMax = 5 minutes.
SSH_KEEPALIVE=('--ssh-flag=-o ServerAliveInterval=60' '--ssh-flag=-o ServerAliveCountMax=5')

# ssh_workers NAME WORKER COMMAND: run COMMAND on worker WORKER (0, 1, ... or all) of TPU NAME.
ssh_workers() {
  run_gcloud compute tpus tpu-vm ssh "$1" "--zone=$TPU_ZONE" "--worker=$2" "${SSH_KEEPALIVE[@]}" "--command=$3"
}

# join_statements STATEMENT ...: one shell line; each statement must be complete on its own.
join_statements() {
  local out="" s
  for s in "$@"; do
    out+="${out:+; }$s"
  done
  printf '%s' "$out"
}

# ------------------------------------------------------------------ training runs (train.sh, sweep.sh)

# normalize_overrides ARG ...: config overrides as `dit-jax train` takes them, in OVERRIDES:
# "a.b=value" -> "--config.a.b=value", "config.a.b=value" -> "--config.a.b=value", "--config.a.b[=value]"
# kept, a bare "a.b" (a bool set to True) -> "--config.a.b". Exits 2 on anything else.
normalize_overrides() {
  OVERRIDES=()
  local o
  for o in "$@"; do
    case $o in
      --config.?*) OVERRIDES+=("$o") ;;
      config.?*) OVERRIDES+=("--$o") ;;
      -*) usage_error "override '$o' is not of the form key=value or --config.key=value" ;;
      *)
        [[ ${o%%=*} =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] ||
          usage_error "override '$o' is not of the form key=value or --config.key=value"
        OVERRIDES+=("--config.$o")
        ;;
    esac
  done
}

# check_tpu_for_training NAME WORKDIR: the TPU VM must exist and be READY (an error otherwise; a warning in
# dry-run mode), and every worker of a multi-host slice must write to the same place, so WORKDIR must be on
# GCS there (exit 2 otherwise). Sets WORKERS: the slice's number of workers (hosts), empty when unknown (a dry
# run of a TPU that does not exist yet).
check_tpu_for_training() {
  local name=$1 workdir=$2 workers
  WORKERS=""
  if tpu_info "$name"; then
    workers=$TPU_WORKERS
    if ! tpu_state_advice "$name" "$TPU_STATE"; then
      ((DRY_RUN)) || die "$ADVICE"
      info "warning: $ADVICE; a real run would fail here"
    fi
  else
    if ((DRY_RUN)); then
      info "warning: TPU $name does not exist in $TPU_ZONE (yet); a real run would fail here"
      [[ $workdir == gs://* ]] || info "warning: --workdir $workdir is not a gs:// path (required on multi-worker slices)"
      return 0
    fi
    die "TPU $name does not exist in zone $TPU_ZONE: create it first (create.sh)"
  fi
  WORKERS=$workers
  if [[ $workdir != gs://* ]]; then
    if [[ -n $workers ]] && ((workers > 1)); then
      usage_error "--workdir must be a gs:// path on a multi-worker slice ($name has $workers workers, each with its own disk): got '$workdir'"
    fi
    info "warning: --workdir $workdir is on the TPU VM's own disk, not on GCS; it is lost when the TPU is deleted"
  fi
}

# train_remote_command CONFIG WORKDIR LOGNAME WAIT PROGRESS ARG ...: the command every worker runs.
# Starts `dit-jax train --config CONFIG --workdir WORKDIR ARG ...` detached (setsid + nohup: closing ssh does
# not stop it), appending to ~/dit-jax-logs/LOGNAME.log, unless a run with the same LOGNAME is still going on
# that worker (then it says so and starts nothing). WAIT=1: then waits for the run to end and exits with its
# status, printing a line every PROGRESS seconds meanwhile (0: none) with the log's last line, so that the
# session is never silent for long.
train_remote_command() {
  local config=$1 workdir=$2 logname=$3 wait=$4 progress=$5
  shift 5
  local trainer runner stmts
  trainer=$(quote_words train --config "$config" --workdir "$workdir" "$@")
  # shellcheck disable=SC2016
  runner='log=$1; rcf=$2; shift 2; echo "== $(date -u +%FT%TZ) $(hostname): $*" >>"$log"; "$@" >>"$log" 2>&1; echo $? >"$rcf"'
  # shellcheck disable=SC2016
  stmts=(
    'set -eu'
    "[ -x $REMOTE_VENV/bin/dit-jax ] || { echo \"\$(hostname): $REMOTE_VENV/bin/dit-jax is missing: run setup.sh first\" >&2; exit 1; }"
    "cd $REMOTE_DIR"
    "mkdir -p $REMOTE_LOGS"
    "log=$REMOTE_LOGS/$logname.log; pidf=$REMOTE_LOGS/$logname.pid; rcf=$REMOTE_LOGS/$logname.rc"
    "ln -sfn $logname.log $REMOTE_LOGS/latest.log"
    'pid=$(cat "$pidf" 2>/dev/null || true)'
    "if [ -n \"\$pid\" ] && kill -0 \"\$pid\" 2>/dev/null && grep -q dit-jax \"/proc/\$pid/cmdline\" 2>/dev/null; then echo \"\$(hostname): $logname is already running (pid \$pid): not starting another\"; else rm -f \"\$rcf\"; nohup setsid bash -c $(shquote "$runner") dit-jax-run \"\$log\" \"\$rcf\" $REMOTE_VENV/bin/dit-jax $trainer </dev/null >/dev/null 2>&1 & pid=\$!; echo \"\$pid\" >\"\$pidf\"; echo \"\$(hostname): started $logname (pid \$pid), log \$log\"; fi"
  )
  if ((wait)); then
    # A ticker prints progress while `wait` blocks (wait returns as soon as the run ends); killed, it stops its
    # own sleep too.
    # shellcheck disable=SC2016
    stmts+=(
      'tick='
      "if [ $progress -gt 0 ]; then ( s=; trap 'kill \$s 2>/dev/null; exit 0' TERM; t=0; while :; do sleep $progress </dev/null >/dev/null 2>&1 & s=\$!; wait \$s; t=\$((t + $progress)); echo \"\$(hostname): $logname still running after \${t}s; log: \$(tail -n 1 \"\$log\" 2>/dev/null | tr -d '\\r' | cut -c 1-200)\"; done ) & tick=\$!; fi"
      'wait "$pid" 2>/dev/null || true'
      'while kill -0 "$pid" 2>/dev/null; do sleep 5; done'
      'if [ -n "$tick" ]; then kill "$tick" 2>/dev/null || true; fi'
      'rc=$(cat "$rcf" 2>/dev/null || echo 1)'
      "echo \"\$(hostname): $logname finished with exit status \$rc\""
      'exit "$rc"'
    )
  fi
  join_statements "${stmts[@]}"
}

# idle_remote_command POLL PROGRESS: a worker command that returns once no dit-jax run started by train.sh is
# going on that worker (the pid files in ~/dit-jax-logs, as train.sh's own check), checking every POLL seconds
# and saying what it waits for every PROGRESS seconds (silent when there is nothing to wait for).
idle_remote_command() {
  local poll=$1 progress=$2 stmts
  # shellcheck disable=SC2016
  stmts=(
    'set -eu'
    "busy() { for f in $REMOTE_LOGS/*.pid; do [ -e \"\$f\" ] || continue; p=\$(cat \"\$f\" 2>/dev/null || true); if [ -n \"\$p\" ] && kill -0 \"\$p\" 2>/dev/null && grep -q dit-jax \"/proc/\$p/cmdline\" 2>/dev/null; then printf ' %s (pid %s)' \"\$(basename \"\$f\" .pid)\" \"\$p\"; fi; done; }"
    't=0; next=0'
    "while runs=\$(busy); [ -n \"\$runs\" ]; do if [ \"\$t\" -ge \"\$next\" ]; then echo \"\$(hostname): waiting for a run still going:\$runs\"; next=\$((t + $progress)); fi; sleep $poll; t=\$((t + $poll)); done"
    "if [ \"\$t\" -gt 0 ]; then echo \"\$(hostname): no run going any more (waited \${t}s)\"; fi"
  )
  join_statements "${stmts[@]}"
}

# log_name_for WORKDIR: a file-name-safe run name from the last component of WORKDIR.
log_name_for() {
  local base=${1%/}
  base=${base##*/}
  base=${base//[^A-Za-z0-9._-]/-}
  printf '%s' "${base:-run}"
}
