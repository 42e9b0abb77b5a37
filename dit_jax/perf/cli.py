"""The `dit-jax bench` and `dit-jax flops` commands (layer 4; the libraries are dit_jax.perf.bench and
dit_jax.perf.flops). `register(subparsers, name)` adds the parser of either; the handlers are `run_bench` and
`run_flops`. Errors follow dit_jax/errors.py: a bad usage raises UsageError (exit 2), anything else raises (exit 1);
only dit_jax.cli.main prints them.

Importing this module imports neither jax nor the libraries: each handler imports what its command needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from dit_jax.constants import BLOCK_TYPES  # the paper's block designs (section 3.2), without importing jax
from dit_jax.errors import MissingDependencyError, UsageError

COMMAND_NAMES = ("bench", "flops")


def register(subparsers: Any, name: str) -> argparse.ArgumentParser:
    """Add the parser of command `name` ("bench" or "flops") to a `dit-jax` subparsers object."""
    if name == "bench":
        return _register_bench(subparsers, name)
    if name == "flops":
        return _register_flops(subparsers, name)
    raise ValueError(f"dit_jax.perf.cli has no command {name!r}; expected one of {COMMAND_NAMES}")


# ==============================================================================================================
# `dit-jax bench`
# ==============================================================================================================
BENCH_DESCRIPTION = """`dit-jax bench train|sample`: our throughput; --torch interleaves the PyTorch references.

    dit-jax bench train  --variant S/2 --batch 32 --dtype float32 --torch    # ratio to the official code, spread
    dit-jax bench train  --variant S/2 --batch 32 --dtype float32 --settings scan unrolled scan:dots_no_batch
    dit-jax bench sample --variant XL/2 --batch 64 --dtype bfloat16 --torch --torch-device cuda

Alone, ours runs in this process: warm-up, then the median of --windows timed windows. With --torch (or several
--settings of ours), every contender runs in its own worker process (ours: dit_jax.perf.bench.serve; the references:
bench/torch_reference.py serve), so none shares threads with another, and the windows interleave: each of the
--repeats (= --windows) rounds times one window of --steps // --windows calls of every contender in turn. A ratio is
computed per round and printed as the median with its spread over the rounds (min-max and quartiles).

References (--torch-refs): official = the official facebookresearch/DiT training iteration (models.py as
tests/official_dit_torch.py transcribes it, with timm >= 0.9's fused attention; the guided-diffusion hybrid loss;
AdamW; train.py's update_ema), official-math = the same with timm's explicit attention, diffusers = the same loop
around diffusers' DiTTransformer2DModel. Ratios are ours / reference in images per second.
"""

TORCH_REFERENCE = Path(__file__).resolve().parents[2] / "bench" / "torch_reference.py"
TORCH_REFERENCE_NEEDS = "the PyTorch reference (--torch)"
TORCH_REFERENCE_INSTALL = "pip install -e '.[test]' (torch and diffusers)"
TORCH_REFERENCES = ("official", "official-math", "diffusers")
DEFAULT_TORCH_REFERENCES = ("official", "diffusers")


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


def torch_worker_argv(mode: str, impl: str, args: argparse.Namespace) -> list[str]:
    """The command line of a reference worker (bench/torch_reference.py serve) with the configuration of `args`."""
    return [sys.executable, str(_torch_reference_path()), "serve", mode, "--impl", impl, "--variant", args.variant,
            "--batch", str(args.batch), "--res", str(args.res), "--warmup", str(args.warmup),
            "--device", args.torch_device, "--amp", args.torch_amp, "--cfg-scale", str(args.cfg_scale)]


def parse_setting(text: str, default_remat: str | None) -> tuple[bool, str | None]:
    """`scan` | `unrolled`, optionally `:REMAT` -> (scan_blocks, remat_policy); UsageError otherwise."""
    from dit_jax.models.dit import REMAT_POLICIES

    blocks, _, remat = text.partition(":")
    if blocks not in ("scan", "unrolled") or (remat and remat not in REMAT_POLICIES):
        raise UsageError(f"--settings {text}: expected scan|unrolled, optionally :REMAT with REMAT one of "
                         f"{tuple(REMAT_POLICIES)}, e.g. unrolled:dots_no_batch")
    return blocks == "scan", remat or default_remat


def check_torch_reference_installed(args: argparse.Namespace | None = None) -> None:
    """MissingDependencyError, before anything is measured, when the reference's packages are not installed
    (looked up, not imported: the reference runs in its own process)."""
    refs = getattr(args, "torch_refs", DEFAULT_TORCH_REFERENCES) if args is not None else DEFAULT_TORCH_REFERENCES
    for package in ("torch", "diffusers") if "diffusers" in refs else ("torch",):
        if importlib.util.find_spec(package) is None:
            raise MissingDependencyError(package, TORCH_REFERENCE_NEEDS, TORCH_REFERENCE_INSTALL)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def format_result(r: dict[str, Any]) -> str:
    """Two or three lines: what ran, its rates, and (interleaved runs) its seconds per call in each round."""
    setting = (f" {'scan' if r['scan_blocks'] else 'unrolled'} remat={r['remat_policy']}"
               if "scan_blocks" in r else "")
    lines = [f"{r.get('name', r['impl'])}: {r['mode']} {r['variant']} batch {r['batch']} res {r['res']} {r['dtype']}"
             f"{setting} on {r.get('device_kind') or r.get('device')}"
             + (f" x{r['devices']}" if r.get("devices") else "")]
    keys = ("step_s", "steps_per_s", "images_per_s", "tflops_per_device", "mfu", "trace_lower_s", "compile_s",
            "memory_estimate_gib", "peak_memory_gib")
    lines.append("  " + "  ".join(f"{k}={_fmt(r[k])}" for k in keys if k in r))
    if "round_step_s" in r:
        lines.append("  s/call per round: " + " ".join(f"{t:.3g}" for t in r["round_step_s"])
                     + ("  (CPU s / wall s: " + " ".join(f"{u:.2f}" for u in r["round_cpu_per_wall"]) + ")"
                        if "round_cpu_per_wall" in r else ""))
    return "\n".join(lines)


def format_ratio(r: dict[str, Any]) -> str:
    """`ratio A / B (images/s): median, min-max and quartiles over the rounds`."""
    return (f"ratio {r['numerator']} / {r['denominator']} (images/s): {r['median']:.2f}x, median of {r['rounds']} "
            f"rounds (min {r['min']:.2f}, max {r['max']:.2f}; quartiles {r['q1']:.2f}-{r['q3']:.2f})")


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
    if args.remat is not None and args.remat not in REMAT_POLICIES:
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
    for text in args.settings or ():
        parse_setting(text, args.remat)
    if args.settings and len(set(args.settings)) != len(args.settings):
        raise UsageError(f"--settings {' '.join(args.settings)}: each setting once")
    bad = [r for r in args.torch_refs if r not in TORCH_REFERENCES]
    if bad or not args.torch_refs or len(set(args.torch_refs)) != len(args.torch_refs):
        raise UsageError(f"--torch-refs {','.join(args.torch_refs)}: expected distinct names among "
                         f"{TORCH_REFERENCES}, e.g. official,diffusers")
    if args.json:  # results are appended to it: its folder must exist
        from dit_jax.paths import check_output_file

        check_output_file(args.json, "--json", parent_must_exist=True)  # exit 1, as every unwritable output
    if args.torch:
        check_torch_reference_installed(args)


def run_bench(args: argparse.Namespace) -> int:
    """`dit-jax bench MODE ...`: ours alone in this process, or (--torch, --settings) interleaved worker processes
    with per-round ratios; --json appends the results."""
    import jax

    from dit_jax.perf import bench

    check_args(args, jax.device_count())
    platform = jax.devices()[0].platform
    dtype = args.dtype
    if dtype == "auto":  # fp32 on the CPU (and in the CPU targets), bf16 matmuls on accelerators
        dtype = "float32" if platform == "cpu" else "bfloat16"
    spec = bench.BenchSpec(variant=args.variant, batch=args.batch, res=args.res, dtype=dtype,
                           scan_blocks=args.scan, remat_policy=args.remat, attn_impl=args.attn, steps=args.steps,
                           warmup=args.warmup, windows=args.windows, devices=args.devices, cfg_scale=args.cfg_scale)
    if args.settings:
        specs = [dataclasses.replace(spec, scan_blocks=scan, remat_policy=remat)
                 for scan, remat in (parse_setting(t, args.remat) for t in args.settings)]
    else:
        specs = [spec]
    specs = [s.resolved(platform) for s in specs]
    if len({_setting_name(s) for s in specs}) != len(specs):
        raise UsageError(f"--settings {' '.join(args.settings)}: two of them are the same setting on {platform} "
                         f"(a setting without :REMAT takes the platform's default remat policy)")
    if not args.torch and len(specs) == 1:
        results = [bench.run_bench(args.mode, specs[0])]
        print(format_result(results[0]), flush=True)
    else:
        results = run_interleaved(args.mode, specs, args)
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return 0


def _setting_name(spec: Any) -> str:
    return f"dit-jax[{'scan' if spec.scan_blocks else 'unrolled'},remat={spec.remat_policy}]"


def run_interleaved(mode: str, specs: list[Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Our specs (resolved) and, with args.torch, the references in args.torch_refs, each in a worker process,
    interleaved over args.windows rounds of args.steps // args.windows calls. Prints each contender and the
    per-round ratios (ours / each reference; with several of ours, each / the first); returns the contenders'
    reports followed by the ratio records."""
    from dit_jax.perf import bench

    named = [("dit-jax" if len(specs) == 1 else _setting_name(s), s) for s in specs]
    refs = list(args.torch_refs) if args.torch else []
    timeout = args.worker_timeout
    workers: list[Any] = []
    try:
        env = bench.worker_env()
        for name, s in named:  # started one after the other: a compile never overlaps another's warm-up
            workers.append(bench.Worker(name, bench.our_worker_argv(mode, s), start_timeout=timeout,
                                        timeout=timeout, env=env))
        for impl in refs:
            try:
                workers.append(bench.Worker(f"pytorch-{impl}", torch_worker_argv(mode, impl, args),
                                            start_timeout=timeout, timeout=timeout, env=env))
            except bench.WorkerError as e:
                missing = re.search(r"No module named '([\w.]+)'", str(e))
                if missing:
                    raise MissingDependencyError(missing.group(1).split(".")[0], TORCH_REFERENCE_NEEDS,
                                                 TORCH_REFERENCE_INSTALL, str(e).splitlines()[-1]) from None
                raise
        times = bench.interleave(workers, rounds=args.windows, calls=max(1, args.steps // args.windows))
        done = {w.name: w.close() for w in workers}
    finally:
        for w in workers:
            w.__exit__(None, None, None)
    results = []
    for w in workers:
        info = dict(w.info, **{k: v for k, v in done[w.name].items() if v is not None})
        cpu = [m.get("cpu_s_per_call") for m in w.windows]
        r = dict(bench.summarise(info, times[w.name], cpu), name=w.name,
                 calls_per_window=max(1, args.steps // args.windows))
        print(format_result(r), flush=True)
        results.append(r)
    ours = [n for n, _ in named]
    pairs = [(o, f"pytorch-{impl}") for o in ours for impl in refs] + [(o, ours[0]) for o in ours[1:]]
    for numer, denom in pairs:  # images/s of numer over denom = seconds per call of denom over numer's
        stats = bench.ratio_stats(times[denom], times[numer])
        ratio = dict(kind="ratio", mode=mode, numerator=numer, denominator=denom, **stats)
        print(format_ratio(ratio), flush=True)
        results.append(ratio)
    return results


def _register_bench(sub: Any, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, description=BENCH_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("train", "sample"))
    p.add_argument("--variant", default="S/2", help="S|B|L|XL / 2|4|8 (default S/2)")
    p.add_argument("--batch", type=_int_at_least(1), default=32, help="global batch (images)")
    p.add_argument("--res", type=_int_at_least(8), default=256,
                   help="image resolution in pixels (latents are res // 8)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="matmul compute dtype (auto: float32 on the CPU, bfloat16 on GPU/TPU)")
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=None,
                   help="scan over blocks (default: the platform's, dit_jax.perf.bench.PLATFORM_DEFAULTS)")
    p.add_argument("--remat", default=None,
                   help="remat policy: none, full, dots, dots_no_batch (default: the platform's)")
    p.add_argument("--settings", nargs="+", metavar="SETTING",
                   help="several of our settings, interleaved: scan|unrolled[:REMAT] each (e.g. scan unrolled "
                        "scan:dots_no_batch); ratios are to the first")
    p.add_argument("--attn", default="xla", help="attention implementation (xla, cudnn, splash)")
    p.add_argument("--steps", type=_int_at_least(1), default=20, help="timed calls (split into --windows windows)")
    p.add_argument("--warmup", type=_int_at_least(0), default=3)
    p.add_argument("--windows", "--repeats", dest="windows", type=_int_at_least(1), default=5,
                   help="timed windows; the median is reported (interleaved: the rounds)")
    p.add_argument("--devices", type=_int_at_least(0), default=0, help="devices to use (0: all)")
    p.add_argument("--cfg-scale", type=_finite_at_least_zero, default=4.0)
    p.add_argument("--torch", action="store_true",
                   help="interleave with the PyTorch references and print the ratios with their spread")
    p.add_argument("--torch-refs", type=lambda t: tuple(t.split(",")), default=DEFAULT_TORCH_REFERENCES,
                   help=f"comma-separated, from {','.join(TORCH_REFERENCES)} (default official,diffusers)")
    p.add_argument("--worker-timeout", type=_finite_at_least_zero, default=1800.0,
                   help="seconds a worker may take to start (compile, warm up) or to time one window")
    p.add_argument("--torch-device", default="cpu", help="device of the reference (cpu, cuda)")
    p.add_argument("--torch-amp", choices=("none", "bf16"), default="none",
                   help="reference precision: none = its default fp32 (TF32 matmuls on CUDA, as train.py)")
    p.add_argument("--json", help="append the results as JSON lines to this file")
    p.set_defaults(func=run_bench)
    return p


# ==============================================================================================================
# `dit-jax flops`
# ==============================================================================================================
def _register_flops(subparsers: Any, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        description=(
            "Print one row per DiT variant (S, B, L, XL x patch 8, 4, 2): trainable parameters in millions (the "
            "fixed pos_embed excluded, as in the paper's Table 4) and GFLOPs of one batch-1 forward pass counted as "
            "multiply-accumulates of matmuls and convolutions, the convention of the DiT paper (Table 4); "
            "elementwise work is ignored. Real FLOPs are about twice that."
        ))
    parser.add_argument(
        "--image-size",
        type=int,
        default=256,
        help="image side in pixels, a multiple of 64; the latent is image_size/8 (the paper: 256 and 512; default 256)",
    )
    parser.add_argument(
        "--block-type",
        choices=BLOCK_TYPES,
        default="adaLN-Zero",
        help="DiT block design (paper Figure 5; default adaLN-Zero)",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list instead of a table")
    parser.set_defaults(func=run_flops)
    return parser


def run_flops(args: argparse.Namespace) -> int:
    """Print the table (or JSON) for args.image_size and args.block_type. UsageError for a bad --image-size."""
    image_size = args.image_size
    if image_size <= 0 or image_size % 64:
        # latent = image / 8 must split into 8 x 8 patches for the /8 variants
        raise UsageError(f"--image-size must be a positive multiple of 64 (the VAE's 8 x the largest patch, 8), got "
                         f"{image_size}; e.g. 256 or 512")
    from dit_jax.perf.flops import flops_table, format_table

    rows = flops_table(image_size=image_size, block_type=args.block_type)
    if args.json:
        _write(json.dumps(rows, indent=2))
        return 0
    latent = image_size // 8
    _write(
        f"DiT at {image_size}x{image_size} px (latent {latent}x{latent}x4), {args.block_type} blocks, 1000 classes\n"
        "GFLOPs: multiply-accumulates of one forward pass with batch 1 (the paper's convention; real FLOPs ~2x); "
        "params: trainable, the fixed pos_embed excluded (as the paper's Table 4)\n"
        + format_table(rows)
    )
    return 0


def _write(text: str) -> None:
    """Print `text` and flush now, so that an output that cannot be written (a full disk, a closed pipe) is an
    error of this command, naming standard output."""
    try:
        print(text, flush=True)
    except OSError as e:
        raise OSError(e.errno, e.strerror, "<standard output>") from e
