"""`dit-jax convert`: an official .pt or a diffusers folder -> an Orbax checkpoint + dit_config.json.

    dit-jax convert --variant DiT-XL/2 --image-size 256 DiT-XL-2-256x256.pt out/dit-xl-2-256
    dit-jax convert path/to/DiT-XL-2-256/transformer out/dit-xl-2-256          # diffusers: config.json decides

Output folder: `state/` (Orbax StandardCheckpointer of nnx.state(model)) and `dit_config.json` (the DiT
constructor arguments, variant, source and sha256 of the input). It is written to a temporary sibling folder
and renamed at the end, so an interrupted run leaves nothing half-written. In Python,
`dit_jax.convert.load_converted(path)` rebuilds the model (the format: dit_jax/convert/folder.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dit_jax.convert.common import CheckpointMismatchError
from dit_jax.convert.folder import ConvertError, check_options, convert
from dit_jax.errors import UsageError


def register(subparsers: Any, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="official .pt (release or train.py checkpoint) or diffusers model folder")
    p.add_argument("output_dir", help="folder to create (state/ + dit_config.json)")
    p.add_argument("--source", choices=("official", "diffusers"), help="default: detected from INPUT")
    p.add_argument("--variant", help="e.g. DiT-XL/2; default: from config.json, train.py args or the shapes")
    p.add_argument("--image-size", type=int, help="image side in px (latents are 1/8 of it), e.g. 256 or 512")
    p.add_argument("--num-heads", type=int, help="heads, for a checkpoint whose width is not a paper variant's")
    p.add_argument(
        "--weights", choices=("ema", "model"), default="ema", help="train.py checkpoints: which weights (default ema)"
    )
    p.add_argument("--scan-blocks", action="store_true", help="store the blocks stacked (scan_blocks=True)")
    p.add_argument(
        "--timestep-freq-shift",
        type=float,
        default=0.0,
        help="0 (default): official timestep frequencies; 1: diffusers' formula, only for weights trained "
        "with diffusers' DiT code",
    )
    p.add_argument(
        "--embedder-atol",
        type=float,
        default=0.0,
        help="diffusers: accept per-block embedder copies differing by up to this much (default exact)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Carry out `dit-jax convert`; errors are raised (dit_jax.errors: one line, exit 1; 2 for bad options)."""
    try:
        check_options(args.image_size, args.num_heads, args.embedder_atol, args.timestep_freq_shift)
    except ConvertError as e:
        raise UsageError(str(e)) from e
    try:
        meta = convert(
            args.input,
            args.output_dir,
            source=args.source,
            variant=args.variant,
            image_size=args.image_size,
            num_heads=args.num_heads,
            weights=args.weights,
            scan_blocks=args.scan_blocks,
            timestep_freq_shift=args.timestep_freq_shift,
            embedder_atol=args.embedder_atol,
            overwrite=args.overwrite,
        )
    except CheckpointMismatchError as e:  # hundreds of keys: one line here, the full list with --debug
        raise ConvertError(f"{args.input}: {e.summary()}") from e
    name = meta["variant"] or "custom DiT"
    print(
        f"converted {meta['source']} {name} ({meta['num_params']:,} params, {meta['image_size']} px, "
        f"{meta['model']['num_classes']} classes) -> {Path(args.output_dir).absolute()}"
    )
    return 0
