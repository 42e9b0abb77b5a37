#!/usr/bin/env bash
# setup.sh: install jax[tpu] and dit-jax on every worker of a TPU VM (all at once, --worker=all).
#
#   launch/tpu/setup.sh --name dit-v4 --zone us-central2-b                      # copy this checkout
#   launch/tpu/setup.sh --name dit-pod --zone us-central2-b --repo https://github.com/OWNER/dit-jax.git --ref main
#
# Options:
#   --name NAME          TPU name (env DIT_JAX_TPU_NAME)                                         [required]
#   --zone ZONE          zone (env DIT_JAX_TPU_ZONE)                                             [required]
#   --source DIR         copy this local tree (default: the checkout this script is in); git-tracked and
#                        untracked-but-not-ignored files only (no .git, .venv, runs/), packed into one tarball
#   --repo URL           instead, git clone URL on every worker (a fetch + checkout when already cloned)
#   --ref REF            with --repo: branch, tag or commit to check out (default: the remote's HEAD)
#   --python VERSION     Python of the worker virtualenv (default 3.11, what setup.py requires)
#   --jax-version V      jax[tpu] version (default: the jax== pin of setup.py, 0.10.2)
#   --project PROJECT    gcloud project (env DIT_JAX_TPU_PROJECT)
#   --dry-run            print the gcloud commands instead of running them
#   -h, --help           this help
#
# On each worker: uv (pip --user, else its installer), a virtualenv ~/dit-jax-venv made by uv with Python 3.11 (the TPU images
# ship an older Python), the source in ~/dit-jax, then one
#   pip install "jax[tpu]==0.10.2" gcsfs -e ~/dit-jax
# (libtpu comes from PyPI as a dependency of jax[tpu]: no -f libtpu_releases.html index is needed). The
# package only, not its test extras (requirements.txt pins a CPU torch for the tests).
# Idempotent: rerunning refreshes the source (clone: fetch + checkout; copy: replaced) and reinstalls.
set -euo pipefail
# shellcheck source=launch/tpu/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SOURCE=""
REPO=""
REF=HEAD
PYTHON_VERSION=3.11
JAX_VERSION=$(sed -n 's/.*"jax==\([0-9][0-9.]*\)".*/\1/p' "$REPO_ROOT/setup.py" 2>/dev/null | head -n 1)
JAX_VERSION=${JAX_VERSION:-0.10.2}

normalize_args "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case $1 in
    --source) need_value "$@"; SOURCE=$2; shift 2 ;;
    --repo) need_value "$@"; REPO=$2; shift 2 ;;
    --ref) need_value "$@"; REF=$2; shift 2 ;;
    --python) need_value "$@"; PYTHON_VERSION=$2; shift 2 ;;
    --jax-version) need_value "$@"; JAX_VERSION=$2; shift 2 ;;
    *) common_option "$@"; shift "$COMMON_SHIFT" ;;
  esac
done
require --name="$TPU_NAME" --zone="$TPU_ZONE"
[[ -z $SOURCE || -z $REPO ]] || usage_error "give --source or --repo, not both"
if [[ -z $REPO ]]; then
  SOURCE=${SOURCE:-$REPO_ROOT}
  [[ -f $SOURCE/setup.py ]] || usage_error "--source $SOURCE is not a dit-jax tree (no setup.py)"
  SOURCE=$(cd "$SOURCE" && pwd)
fi

if ! tpu_exists "$TPU_NAME"; then
  ((DRY_RUN)) || die "TPU $TPU_NAME does not exist in zone $TPU_ZONE: create it first (create.sh)"
  info "warning: TPU $TPU_NAME does not exist in $TPU_ZONE (yet); a real run would fail here"
fi

# shellcheck disable=SC2016
STMTS=(
  'set -eu'
  'export PATH="$HOME/.local/bin:$PATH"'
  'command -v uv >/dev/null 2>&1 || python3 -m pip install --user --quiet uv || python3 -m pip install --user --quiet --break-system-packages uv || curl -LsSf https://astral.sh/uv/install.sh | sh'
  "[ -x $REMOTE_VENV/bin/python ] || uv venv --seed --python $(shquote "$PYTHON_VERSION") $REMOTE_VENV"
)

if [[ -n $REPO ]]; then
  # shellcheck disable=SC2016
  STMTS+=(
    "if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR remote set-url origin $(shquote "$REPO") && git -C $REMOTE_DIR fetch --quiet --tags --force origin; else rm -rf $REMOTE_DIR && git clone --quiet $(shquote "$REPO") $REMOTE_DIR; fi"
    "cd $REMOTE_DIR"
    "ref=$(shquote "$REF")"
    'if git rev-parse --verify --quiet "origin/$ref^{commit}" >/dev/null; then ref="origin/$ref"; fi'
    'git checkout --quiet --force --detach "$ref"'
    'echo "$(hostname): source at $(git rev-parse --short HEAD)"'
  )
else
  TARBALL="${TMPDIR:-/tmp}/dit-jax-source-$TPU_NAME.tar.gz"
  if ((DRY_RUN)); then
    info "dry run: would pack $SOURCE into $TARBALL"
  else
    info "packing $SOURCE into $TARBALL"
    if [[ -e $SOURCE/.git ]]; then
      # tracked and untracked-but-not-ignored files that exist (a deleted tracked file is skipped)
      git -C "$SOURCE" ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do
          if [[ -f $SOURCE/$f ]]; then printf '%s\0' "$f"; fi
        done |
        tar -C "$SOURCE" --null -T - -czf "$TARBALL"
    else
      tar -C "$SOURCE" --exclude=.git --exclude=.venv --exclude=__pycache__ --exclude=runs -czf "$TARBALL" .
    fi
  fi
  run_gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:dit-jax-source.tar.gz" "--zone=$TPU_ZONE" --worker=all
  # shellcheck disable=SC2016
  STMTS+=(
    'rm -rf "$HOME/dit-jax.new"'
    'mkdir -p "$HOME/dit-jax.new"'
    'tar -xzf "$HOME/dit-jax-source.tar.gz" -C "$HOME/dit-jax.new"'
    "rm -rf $REMOTE_DIR"
    "mv \"\$HOME/dit-jax.new\" $REMOTE_DIR"
    'rm -f "$HOME/dit-jax-source.tar.gz"'
  )
fi

# shellcheck disable=SC2016
STMTS+=(
  # gcsfs: gs:// workdirs through etils.epath (checkpoint metadata, the logs the trainer copies there)
  "$REMOTE_VENV/bin/python -m pip install --quiet $(shquote "jax[tpu]==$JAX_VERSION") gcsfs -e $REMOTE_DIR"
  "$REMOTE_VENV/bin/python -c 'import jax, dit_jax; print(\"dit-jax\", dit_jax.__version__, \"jax\", jax.__version__)'"
  'echo "$(hostname): ready"'
)

ssh_workers "$TPU_NAME" all "$(join_statements "${STMTS[@]}")"
