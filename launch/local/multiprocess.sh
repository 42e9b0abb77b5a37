#!/usr/bin/env bash
# multiprocess.sh: simulate a pod on this machine: N processes of one command, wired as one JAX job.
#
#   launch/local/multiprocess.sh -n 2 --cpu-devices 4 -- dit-jax train \
#       --config configs/digits.py:runlocal=True --workdir runs/mp
#
# Options (before --):
#   -n N              number of processes (default 2)
#   --cpu-devices K   K simulated CPU devices per process (JAX_PLATFORMS=cpu); default: the machine's devices
#   --timeout S       stop every process after S seconds
#   --grace S         seconds between SIGTERM and SIGKILL when the others are stopped (default 20)
#
# Each process gets JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port), JAX_NUM_PROCESSES and JAX_PROCESS_ID,
# which dit-jax reads before any JAX call; its output lines are prefixed "[pI] ". If one process fails, the
# others are stopped (no hang); Ctrl-C or SIGTERM to this script reaches every process (a preemption notice).
# The code is dit_jax/multiprocess.py. Uses the checkout's .venv when there is one (make venv).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
py=${PYTHON:-}
if [[ -z $py ]]; then
  if [[ -x $root/.venv/bin/python ]]; then
    py=$root/.venv/bin/python
    export PATH="$root/.venv/bin:$PATH"  # so that `dit-jax` in the command is the checkout's
  else
    py=python3
  fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m dit_jax.multiprocess "$@"
