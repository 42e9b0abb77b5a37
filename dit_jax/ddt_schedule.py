"""`dit-jax ddt-schedule`: the statistical dynamic-programming sharing schedule of DDT, computed and saved.

    dit-jax ddt-schedule --checkpoint DDT-XL-22en6de-R256.ckpt --num-steps 250 --refresh-rate 4 \
        --out ddt_xl_250_k62.json
    dit-jax ddt-schedule --variant DDT-S/2 --random-init --res 64 --num-steps 20 --out /tmp/s.json   # smoke run
    dit-jax ddt-schedule --checkpoint runs/ddt --num-steps 250 --out runs/ddt/schedule.json          # your DDT run

As the reference's sharing_dp: a template run (8 noises and labels from seed 0, guidance as configured, the
encoder recomputed every step) records the self-condition s of every step; sim[i][j] is the token-mean cosine
similarity of s_i and s_j; the schedule is the exact minimum-cost split of the steps into num_steps / refresh_rate
segments, each starting with one encoder call (dit_jax.diffusion.sharing.dp_schedule). The template holds every
step's s on the host: num_steps x 2 x batch x tokens x width floats (4.7 GB for XL/2, 250 steps, batch 8).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import jax
import numpy as np

from dit_jax.diffusion import flow
from dit_jax.diffusion.sharing import dp_schedule, save_schedule, schedule_cost, state_similarity, uniform_schedule
from dit_jax.errors import UsageError
from dit_jax.models.ddt import DDT
from dit_jax.sample_ddt import DEFAULT_VARIANT, DDTSampler, load_flow_model

PIXELS_PER_TOKEN = 16  # the SD VAE's 8x downsampling x the DDT variants' patch size 2


def compute_schedule(model: DDT, settings: flow.FlowSampleSettings, num_recompute: int, batch: int = 8,
                     seed: int = 0, time_scale: float = 1.0) -> dict[str, Any]:
    """Template run + DP. Returns schedule, its cost, the uniform schedule's cost and the similarity matrix."""
    key = jax.random.key(seed)
    k_noise, k_label = jax.random.split(key)
    side = model.input_size
    noise = jax.random.normal(k_noise, (batch, side, side, model.in_channels))
    labels = jax.random.randint(k_label, (batch,), 0, model.num_classes)
    _, states = DDTSampler(model, settings, time_scale=time_scale)(labels, noise, collect_states=True)
    sim = state_similarity(np.stack(states))
    sched = dp_schedule(sim, num_recompute)
    n = settings.num_steps
    uniform = uniform_schedule(n, max(1, n // num_recompute))[:num_recompute]
    return dict(schedule=sched, cost=schedule_cost(sim, sched), uniform_cost=schedule_cost(sim, uniform), sim=sim)


def check_args(args: argparse.Namespace) -> int:
    """UsageError for arguments that are invalid or do not apply together, then ValueError/OSError for a checkpoint
    no loader reads or an --out that cannot be written: all before the (long) template run. Returns the number of
    encoder calls."""
    from dit_jax.paths import check_output_file
    from dit_jax.sample_ddt_cli import check_flow_args, check_model_args

    check_flow_args(args.num_steps, args.cfg_scale, args.interval_min, args.interval_max, args.shift, args.last_step,
                    steps_flag="--num-steps")
    n = args.num_steps
    if not (math.isfinite(args.refresh_rate) and args.refresh_rate >= 1):
        raise UsageError(f"--refresh-rate {args.refresh_rate}: expected a number >= 1 (num_steps / refresh_rate "
                         "encoder calls)")
    k = int(n / args.refresh_rate)  # the reference's num_recompute_timesteps
    if not 1 <= k <= n:
        raise UsageError(f"--refresh-rate {args.refresh_rate} gives {k} encoder calls for {n} steps: choose a "
                         f"refresh rate of at most {n}")
    if args.batch < 1:
        raise UsageError(f"--batch {args.batch}: expected a positive template batch (the reference uses 8)")
    if args.res is not None and (args.res <= 0 or args.res % PIXELS_PER_TOKEN):
        raise UsageError(f"--res {args.res}: expected a positive multiple of {PIXELS_PER_TOKEN} (the VAE's 8 x the "
                         "patch size 2), e.g. 256")
    check_model_args(args.checkpoint, "--checkpoint", random_init=args.random_init, which=args.which,
                     variant=args.variant)
    check_output_file(args.out, "--out")
    return k


def cmd(args: argparse.Namespace) -> int:
    k = check_args(args)
    n = args.num_steps
    settings = flow.FlowSampleSettings(num_steps=n, cfg_scale=args.cfg_scale, interval_min=args.interval_min,
                                       interval_max=args.interval_max, shift=args.shift, last_step=args.last_step)
    loaded = load_flow_model(args.checkpoint, variant=args.variant or DEFAULT_VARIANT, image_size=args.res,
                             which=args.which or "ema", random_init=args.random_init, seed=args.seed)
    if not getattr(loaded.model, "num_encoder_blocks", 0):
        raise ValueError(f"{args.checkpoint} has no condition encoder to share (a DiT or single-stream model): "
                         "there is no schedule to compute; sample it with `dit-jax sample-ddt` without --schedule")
    out = compute_schedule(loaded.model, settings, k, batch=args.batch, seed=args.seed, time_scale=loaded.time_scale)
    save_schedule(args.out, out["schedule"], num_steps=n, num_recompute=k, cost=out["cost"],
                  uniform_cost=out["uniform_cost"], variant=loaded.name, checkpoint=args.checkpoint or "random-init",
                  cfg_scale=args.cfg_scale, interval=[args.interval_min, args.interval_max], shift=args.shift,
                  last_step=args.last_step, template_batch=args.batch, seed=args.seed)
    print(f"{k} encoder calls in {n} steps; DP cost {out['cost']:.4f} (uniform every {max(1, n // k)}: "
          f"{out['uniform_cost']:.4f}); schedule {out['schedule']}")
    print(f"saved {args.out}")
    return 0


def register(sub: Any, name: str) -> None:
    p = sub.add_parser(name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", help=f"DDT-S/2 | DDT-B/2 | DDT-L/2 | DDT-XL/2 of a checkpoint or --random-init "
                   f"(default {DEFAULT_VARIANT}; a training run's comes from its config)")
    p.add_argument("--checkpoint", help="a DDT checkpoint (.ckpt/.pt from MCG-NJU, or .safetensors), or a dit-jax "
                   "DDT training run (its EMA weights, size and time scale)")
    p.add_argument("--which", choices=("ema", "model"), help="ema_denoiser (default) or denoiser")
    p.add_argument("--random-init", action="store_true", help="random weights (smoke runs, tests)")
    p.add_argument("--res", type=int, default=None, help="image resolution (latents res // 8; default 256, or a "
                   "training run's own)")
    p.add_argument("--num-steps", type=int, default=250)
    p.add_argument("--refresh-rate", type=float, default=4.0, help="encoder calls = num_steps / refresh_rate")
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--interval-min", type=float, default=0.3)
    p.add_argument("--interval-max", type=float, default=1.0)
    p.add_argument("--shift", type=float, default=1.0)
    p.add_argument("--last-step", type=float, default=0.04)
    p.add_argument("--batch", type=int, default=8, help="template batch (the reference uses 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the schedule JSON to write")
    p.set_defaults(func=cmd)
