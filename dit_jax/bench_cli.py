"""`dit-jax bench train|sample`: our throughput and, with --torch, the PyTorch reference's right after it.

    dit-jax bench train  --variant S/2 --batch 32 --dtype float32 --torch    # the CPU target of issue 5
    dit-jax bench sample --variant XL/2 --batch 64 --dtype bfloat16 --torch --torch-device cuda

Ours runs in this process (dit_jax.bench); the reference runs in a fresh Python process
(bench/torch_reference.py: diffusers' DiTTransformer2DModel, the official hybrid loss in torch, AdamW, EMA) so
the two never share threads or memory. The ratio printed is ours / reference in images per second.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from dit_jax.errors import MissingDependencyError

TORCH_REFERENCE = Path(__file__).resolve().parents[1] / "bench" / "torch_reference.py"
TORCH_REFERENCE_NEEDS = "the PyTorch reference (--torch)"
TORCH_REFERENCE_INSTALL = "pip install -e '.[test]' (torch and diffusers)"


def _torch_reference_path() -> Path:
    if not TORCH_REFERENCE.is_file():
        raise FileNotFoundError(
            f"{TORCH_REFERENCE} not found: the side-by-side mode needs a source checkout (pip install -e .)"
        )
    return TORCH_REFERENCE


def load_torch_reference() -> ModuleType:
    """Import bench/torch_reference.py from the checkout (it is not part of the installed package)."""
    _torch_reference_path()
    spec = importlib.util.spec_from_file_location("dit_jax_bench_torch_reference", TORCH_REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_torch_reference(mode: str, args: argparse.Namespace, timeout: float | None = None) -> dict[str, Any]:
    """Run the reference in a subprocess with the same configuration; returns its JSON result."""
    cmd = [sys.executable, str(_torch_reference_path()), mode, "--variant", args.variant, "--batch", str(args.batch),
           "--res", str(args.res), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--windows", str(args.windows), "--device", args.torch_device, "--amp", args.torch_amp,
           "--cfg-scale", str(args.cfg_scale)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        missing = re.search(r"No module named '([\w.]+)'", proc.stderr or "")
        if missing:
            raise MissingDependencyError(missing.group(1).split(".")[0], TORCH_REFERENCE_NEEDS, TORCH_REFERENCE_INSTALL,
                                         tail[-1])
        raise RuntimeError("the PyTorch reference failed:\n" + "\n".join(tail))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_torch_reference_installed() -> None:
    """MissingDependencyError, before anything is measured, when the reference's packages are not installed
    (looked up, not imported: the reference runs in its own process)."""
    for package in ("torch", "diffusers"):
        if importlib.util.find_spec(package) is None:
            raise MissingDependencyError(package, TORCH_REFERENCE_NEEDS, TORCH_REFERENCE_INSTALL)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def format_result(r: dict[str, Any]) -> str:
    lines = [f"{r['impl']} {r['mode']} {r['variant']} batch {r['batch']} res {r['res']} {r['dtype']} "
             f"on {r.get('device_kind') or r.get('device')}" + (f" x{r['devices']}" if r.get("devices") else "")]
    keys = ("step_s", "steps_per_s", "images_per_s", "tflops_per_device", "mfu", "trace_lower_s", "compile_s",
            "memory_estimate_gib", "peak_memory_gib")
    lines.append("  " + "  ".join(f"{k}={_fmt(r[k])}" for k in keys if k in r))
    return "\n".join(lines)


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= low (argparse reports anything else as a usage error naming the flag)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _finite_at_least_zero(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def check_args(args: argparse.Namespace, device_count: int) -> None:
    """Raise UsageError, naming the flag, for what argparse cannot check alone (before any compile); make sure the
    --json file can be written (it is appended to after the measurements, minutes later)."""
    from dit_jax.errors import UsageError
    from dit_jax.models.dit import REMAT_POLICIES, decode_variant
    from dit_jax.models.layers import ATTENTION_IMPLS

    try:
        patch = decode_variant(args.variant)["patch_size"]
    except ValueError as e:
        raise UsageError(f"--variant {args.variant}: {e}") from None
    if args.res % (8 * patch):
        raise UsageError(f"--res {args.res}: must be a multiple of {8 * patch} (the VAE downsamples by 8, then "
                         f"{args.variant} cuts {patch}x{patch} patches), e.g. 256")
    if args.steps < args.windows:
        raise UsageError(f"--steps {args.steps} must be at least --windows {args.windows} (each window times "
                         f"steps // windows calls)")
    if args.remat not in REMAT_POLICIES:
        raise UsageError(f"--remat {args.remat}: expected one of {tuple(REMAT_POLICIES)}")
    if args.attn not in ATTENTION_IMPLS:
        raise UsageError(f"--attn {args.attn}: expected one of {ATTENTION_IMPLS}")
    if args.devices > device_count:
        raise UsageError(f"--devices {args.devices}: this process sees {device_count} devices (0 = all)")
    n = args.devices or device_count
    rows = args.batch if args.mode == "train" else 2 * args.batch
    if rows % n:
        what = "--batch" if args.mode == "train" else "2 x --batch (the guided forward's inputs)"
        raise UsageError(f"{what} = {rows} is not divisible by the {n} devices: use a multiple of {n}")
    if args.json:  # results are appended to it: its folder must exist
        from dit_jax.paths import check_output_file

        check_output_file(args.json, "--json", parent_must_exist=True)  # exit 1, as every unwritable output
    if args.torch:
        check_torch_reference_installed()


def cmd_bench(args: argparse.Namespace) -> int:
    import jax

    from dit_jax.bench import BenchSpec, run_bench

    check_args(args, jax.device_count())
    dtype = args.dtype
    if dtype == "auto":  # fp32 on the CPU (and in the CPU targets), bf16 matmuls on accelerators
        dtype = "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"
    spec = BenchSpec(variant=args.variant, batch=args.batch, res=args.res, dtype=dtype, scan_blocks=args.scan,
                     remat_policy=args.remat, attn_impl=args.attn, steps=args.steps, warmup=args.warmup,
                     windows=args.windows, devices=args.devices, cfg_scale=args.cfg_scale)
    ours = run_bench(args.mode, spec)
    print(format_result(ours), flush=True)
    results = [ours]
    if args.torch:
        ref = run_torch_reference(args.mode, args)
        print(format_result(ref), flush=True)
        ratio = ours["images_per_s"] / ref["images_per_s"]
        print(f"ratio (dit-jax / pytorch, images/s): {ratio:.2f}x", flush=True)
        results.append(ref)
        results.append(dict(mode=args.mode, ratio_images_per_s=ratio))
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return 0


def register(sub: Any, name: str) -> None:
    p = sub.add_parser(name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("train", "sample"))
    p.add_argument("--variant", default="S/2", help="S|B|L|XL / 2|4|8 (default S/2)")
    p.add_argument("--batch", type=_int_at_least(1), default=32, help="global batch (images)")
    p.add_argument("--res", type=_int_at_least(8), default=256,
                   help="image resolution in pixels (latents are res // 8)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="matmul compute dtype (auto: float32 on the CPU, bfloat16 on GPU/TPU)")
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True, help="scan over blocks")
    p.add_argument("--remat", default="none", help="remat policy (none, full, dots, dots_no_batch)")
    p.add_argument("--attn", default="xla", help="attention implementation (xla, cudnn, splash)")
    p.add_argument("--steps", type=_int_at_least(1), default=20, help="timed calls (split into --windows windows)")
    p.add_argument("--warmup", type=_int_at_least(0), default=3)
    p.add_argument("--windows", type=_int_at_least(1), default=5, help="timed windows; the median is reported")
    p.add_argument("--devices", type=_int_at_least(0), default=0, help="devices to use (0: all)")
    p.add_argument("--cfg-scale", type=_finite_at_least_zero, default=4.0)
    p.add_argument("--torch", action="store_true", help="then run the PyTorch reference and print the ratio")
    p.add_argument("--torch-device", default="cpu", help="device of the reference (cpu, cuda)")
    p.add_argument("--torch-amp", choices=("none", "bf16"), default="none",
                   help="reference precision: none = its default fp32 (TF32 matmuls on CUDA, as train.py)")
    p.add_argument("--json", help="append the results as JSON lines to this file")
    p.set_defaults(func=cmd_bench)
