"""`dit-jax demo`: the main job on the embedded default.

Until the trainer lands this samples a class-conditional grid from a small, randomly initialised DiT in pixel
space with the full pipeline (DiT + respaced Gaussian diffusion + classifier-free guidance) and writes a PNG.
With random weights the images are structured noise: the demo shows the pipeline runs end to end on a CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from dit_jax.images import make_grid, save_png, to_uint8
from dit_jax.models import DiT_models
from dit_jax.sample import SAMPLERS, sample_latents


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="sample a class-conditional grid from a small DiT (CPU, ~1 minute)")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--variant", default="DiT-S/8", choices=sorted(DiT_models), help="model variant")
    p.add_argument("--image-size", type=int, default=32, help="pixel-space input size (default 32)")
    p.add_argument("--channels", type=int, default=3, help="image channels (default 3)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=4, help="samples per class (default 4)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s))", flush=True)
    model = DiT_models[args.variant](
        input_size=args.image_size,
        in_channels=args.channels,
        num_classes=args.num_classes,
        rngs=nnx.Rngs(args.seed),
    )
    labels = np.repeat(np.arange(args.num_classes), args.per_class)
    t0 = time.perf_counter()
    x = sample_latents(
        model,
        labels,
        key=jax.random.key(args.seed),
        num_steps=args.steps,
        cfg_scale=args.cfg_scale,
        sampler=args.sampler,
        clip_denoised=True,  # pixel space: keep x0 predictions in [-1, 1]
    )
    seconds = time.perf_counter() - t0
    images = to_uint8(x)  # (N, H, W, C)
    # one row per class
    grid = make_grid(images, nrow=args.per_class)
    png = save_png(grid, out / "samples.png", upscale=4)
    np.savez(out / "samples.npz", images=images, labels=labels)
    (out / "demo.json").write_text(
        json.dumps(
            dict(variant=args.variant, image_size=args.image_size, steps=args.steps, sampler=args.sampler,
                 cfg_scale=args.cfg_scale, n=len(labels), seconds=round(seconds, 2), weights="random init"),
            indent=2,
        )
    )
    print(f"sampled {len(labels)} images ({args.variant}, {args.sampler} {args.steps} steps, cfg {args.cfg_scale}) "
          f"in {seconds:.1f}s (compile included)")
    print(f"wrote {png} and {out / 'samples.npz'}")
    return 0
