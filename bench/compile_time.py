"""Compile time of a DiT train step, AOT from abstract shapes (nothing is allocated), scan over blocks or not.

    python bench/compile_time.py --variant XL/2 --scan          # issue target: <= 60 s on the CPU
    python bench/compile_time.py --variant XL/2                 # the unrolled blocks, for comparison
    python bench/compile_time.py --variant XL/2 --scan --batch 256 --remat full   # + XLA's memory estimate

The step is the trainer's own (dit_jax.train.step.make_train_step on the configs/dit_imagenet.py model and
optimizer, latent batches of VAE moments), jitted with donation; trace + lower and XLA compile are timed apart.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from dit_jax.diffusion import create_diffusion
from dit_jax.train.config_load import load_config
from dit_jax.train.optim import make_optimizer
from dit_jax.train.state import abstract_state
from dit_jax.train.step import make_train_step


def compile_time(variant: str, scan: bool, batch: int = 2, res: int = 256, remat: str = "none") -> dict[str, float]:
    cfg = load_config(f"configs/dit_imagenet.py:variant={variant},res={res}",
                      [f"model.scan_blocks={scan}", f"model.remat_policy={remat}"])
    optimizer = make_optimizer(cfg.optim)
    graphdef, abstract = abstract_state(cfg.model, optimizer, 0)
    step = make_train_step(graphdef, create_diffusion(""), optimizer, latent_scale=cfg.data.latent_scale)
    side = res // 8
    batch_shapes = {
        "x": jax.ShapeDtypeStruct((batch, side, side, 2 * cfg.model.in_channels), np.float32),  # mean | logvar
        "y": jax.ShapeDtypeStruct((batch,), np.int32),
    }
    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0,)).lower(abstract, batch_shapes)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    out = dict(trace_lower_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2), total_s=round(t2 - t0, 2))
    mem = compiled.memory_analysis()  # XLA's buffer assignment for this backend: arguments, temporaries
    if mem is not None:
        out.update(argument_gib=round(mem.argument_size_in_bytes / 2**30, 2),
                   temp_gib=round(mem.temp_size_in_bytes / 2**30, 2))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="XL/2")
    p.add_argument("--scan", action="store_true", help="scan over blocks (scan_blocks=True)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--res", type=int, default=256)
    p.add_argument("--remat", default="none", help="remat policy: none, full, dots, dots_no_batch")
    args = p.parse_args()
    out = compile_time(args.variant, args.scan, args.batch, args.res, args.remat)
    print(json.dumps(dict(variant=args.variant, scan=args.scan, batch=args.batch, remat=args.remat,
                          platform=jax.devices()[0].platform, **out)))


if __name__ == "__main__":
    main()
