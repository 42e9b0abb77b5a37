"""Sampling speed-up of DDT's encoder sharing against recomputing the encoder every step, next to the FLOP bound.

    python bench/ddt_sharing.py --variant DDT-S/2 --res 256 --batch 2 --num-steps 50 --refresh-rate 4

Random weights (speed does not depend on them). Times the whole sampler (dit_jax.sampling.Sampler, Euler,
CFG 2.0 on [cond | uncond] pairs) after one warm-up run per schedule, for: every step (the plain sampler), uniform
sharing every refresh_rate steps, and the DP schedule with the same number of encoder calls. The FLOP bound is
N (enc + dec) / (N dec + K enc), with enc and dec the traced MACs of one encoder and one decoder call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np
from flax import nnx

from dit_jax.diffusion.sharing import uniform_schedule
from dit_jax.models.ddt import DDT_models
from dit_jax.perf import flops
from dit_jax.sampling import SampleSettings, Sampler, example_keys
from dit_jax.sampling.schedule import compute_schedule


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="DDT-S/2")
    p.add_argument("--res", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--num-steps", type=int, default=50)
    p.add_argument("--refresh-rate", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()

    model = DDT_models[a.variant](input_size=a.res // 8, rngs=nnx.Rngs(0))
    settings = SampleSettings(sampler="euler", num_steps=a.num_steps, cfg_scale=2.0, interval_min=0.3,
                              last_step=0.04)
    n, k = a.num_steps, a.num_steps // a.refresh_rate
    side = model.input_size
    x = jax.random.normal(jax.random.key(0), (2 * a.batch, side, side, model.in_channels))
    t, y = jax.numpy.full((2 * a.batch,), 0.5), jax.numpy.zeros((2 * a.batch,), jax.numpy.int32)
    enc = flops.traced_macs(lambda x, t, y: model.encode(x, t, y), x, t, y)
    dec = flops.traced_macs(lambda x, s: model.decode(x, s), x, model.encode(x, t, y))
    bound = n * (enc + dec) / (n * dec + k * enc)

    schedules = {"every step": None, f"uniform every {a.refresh_rate}": uniform_schedule(n, a.refresh_rate)[:k]}
    schedules[f"DP, {k} encoder calls"] = compute_schedule(model, settings, k, batch=8)["schedule"]
    keys = example_keys(1, range(a.batch))
    labels = np.arange(a.batch) % model.num_classes
    rows = {}
    for name, sched in schedules.items():
        sampler = Sampler(model, dataclasses.replace(settings, schedule=sched))  # None: the plain Euler sampler
        jax.block_until_ready(sampler(labels, keys))  # compile
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(sampler(labels, keys))
            times.append(time.perf_counter() - t0)
        rows[name] = min(times)
    base = rows["every step"]
    print(json.dumps(dict(variant=a.variant, res=a.res, batch=a.batch, num_steps=n, encoder_calls=k,
                          platform=jax.devices()[0].platform, encoder_gmacs=enc / 1e9, decoder_gmacs=dec / 1e9,
                          flop_bound=round(bound, 3),
                          seconds={name: round(s, 3) for name, s in rows.items()},
                          speedup={name: round(base / s, 3) for name, s in rows.items()})))


if __name__ == "__main__":
    main()
