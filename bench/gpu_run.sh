#!/usr/bin/env bash
# The GPU benchmarks of BENCHMARKS.md ("## GPU"), as one script for one short lease of a GPU machine.
#
#   bash bench/gpu_run.sh                 # from a source checkout's root; log and JSON lines to $OUT (or /tmp/gpubench)
#
# Every command runs even if one before it fails (each under its own timeout), and everything goes to stdout.
# Knobs (environment): PY (python, default python3), OUT (output folder), WHL (a folder of wheels to install into
# /tmp/site first and put on PYTHONPATH), EXTRA_AFTER_S (skip the optional runs once this many seconds
# have passed, default 300), CMD_TIMEOUT (seconds per command, default 200), and, for a smoke test on a CPU,
# VARIANT, DTYPE, ATTN, TDEV, B_TRAIN, B_BIG, B_SAMPLE, STEPS, WARMUP, WINDOWS.
set -u
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpubench}
VARIANT=${VARIANT:-XL/2}
DTYPE=${DTYPE:-bfloat16}
ATTN=${ATTN:-cudnn}
TDEV=${TDEV:-cuda}
B_TRAIN=${B_TRAIN:-32}
B_BIG=${B_BIG:-256}
B_SAMPLE=${B_SAMPLE:-64}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-3}
WINDOWS=${WINDOWS:-5}
EXTRA_AFTER_S=${EXTRA_AFTER_S:-300}
CMD_TIMEOUT=${CMD_TIMEOUT:-200}
mkdir -p "$OUT"
JSON="$OUT/results.jsonl"

if [ -n "${WHL:-}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl \
        || echo "WHEEL INSTALL FAILED"
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
# JAX would otherwise take 75% of the GPU up front and keep it while the PyTorch reference runs in its subprocess
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# fail rather than fall back to the CPU if the GPU backend does not load
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}

T=(--steps "$STEPS" --warmup "$WARMUP" --windows "$WINDOWS")

section() { echo; echo "=== [t=${SECONDS}s] $*"; }

run() {  # run a command under the timeout, print it and its exit status, never fail
    section "$*"
    timeout -k 10 "$CMD_TIMEOUT" "$@"
    echo "=== exit status $? [t=${SECONDS}s]"
}

ref() {  # the reference alone (bench/torch_reference.py): MODE BATCH AMP
    run "$PY" bench/torch_reference.py "$1" --variant "$VARIANT" --batch "$2" --amp "$3" --device "$TDEV" "${T[@]}"
}

bench_with_ref() {  # dit-jax bench MODE BATCH with --torch: ours, then the reference in its default precision
    local mode=$1 batch=$2
    run "$PY" -m dit_jax.cli bench "$mode" --variant "$VARIANT" --batch "$batch" --dtype "$DTYPE" --attn "$ATTN" \
        --torch --torch-device "$TDEV" "${T[@]}" --json "$JSON"
}

section "environment"
date -u
nvidia-smi || true
"$PY" -V
"$PY" -m pip show jax jaxlib jax-cuda13-plugin flax optax torch diffusers ml-collections 2>/dev/null \
    | grep -E "^(Name|Version|Location):" || true
"$PY" - <<'EOF' || true
import flax, jax, jaxlib, numpy, optax
print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "flax", flax.__version__, flax.__file__,
      "optax", optax.__version__, "numpy", numpy.__version__)
print("devices", jax.devices())
import dit_jax
print("dit_jax from", dit_jax.__file__)
EOF
"$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.is_available() and torch.cuda.get_device_name(0), 'diffusers', diffusers.__version__, diffusers.__file__)" \
    || true

# 1. XL/2 train step, batch 32, cuDNN attention, then the reference (its default precision: fp32, TF32 matmuls)
bench_with_ref train "$B_TRAIN"
# 2. the guided sampling forward, batch 64, then the reference
bench_with_ref sample "$B_SAMPLE"
# 3. batch 256 with remat full: does it fit, and how fast
run "$PY" -m dit_jax.cli bench train --variant "$VARIANT" --batch "$B_BIG" --dtype "$DTYPE" --remat full \
    "${T[@]}" --json "$JSON"
# 4. the reference in bf16 autocast (--torch-amp bf16), train and sample
ref train "$B_TRAIN" bf16
ref sample "$B_SAMPLE" bf16
# optional, while time is left: batch 256 remat full with cuDNN attention; batch 32 with XLA's attention
if [ "$SECONDS" -lt "$EXTRA_AFTER_S" ]; then
    run "$PY" -m dit_jax.cli bench train --variant "$VARIANT" --batch "$B_BIG" --dtype "$DTYPE" --remat full \
        --attn "$ATTN" "${T[@]}" --json "$JSON"
else
    section "skipped: batch $B_BIG remat full --attn $ATTN (t > ${EXTRA_AFTER_S}s)"
fi
if [ "$SECONDS" -lt "$EXTRA_AFTER_S" ]; then
    run "$PY" -m dit_jax.cli bench train --variant "$VARIANT" --batch "$B_TRAIN" --dtype "$DTYPE" --attn xla \
        "${T[@]}" --json "$JSON"
else
    section "skipped: batch $B_TRAIN --attn xla (t > ${EXTRA_AFTER_S}s)"
fi
section "done"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw,power.limit \
    --format=csv || true
