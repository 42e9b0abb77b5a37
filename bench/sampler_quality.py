"""Steps against quality on a trained digits run (issue 19, item 4): every sampler at several step counts, scored by
the digits Frechet distance and classifier accuracy (dit_jax/evaluate/digits_classifier.py), with the time per 100
images (after compilation) on this machine.

    python bench/sampler_quality.py RUN [--per-class 20] [--json out.json]

RUN: a digits training run (`dit-jax demo --workdir RUN` makes one). Every setting samples the same labels from
the same per-example keys (the same x_T for ddpm, ddim and dpmsolver++), with the run's guidance scale.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

SETTINGS = [("ddpm", 250), ("ddpm", 100), ("ddpm", 50), ("ddpm", 25), ("ddim", 50), ("ddim", 25), ("ddim", 10),
            ("dpmsolver++", 25), ("dpmsolver++", 20), ("dpmsolver++", 15), ("dpmsolver++", 10)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--cfg-scale", type=float, default=None, help="default: the run's train.sample_cfg_scale")
    p.add_argument("--json")
    args = p.parse_args()

    import jax

    from dit_jax.evaluate.digits_classifier import sample_quality
    from dit_jax.images import to_uint8
    from dit_jax.sampling import SampleSettings, Sampler, example_keys
    from dit_jax.sampling.load import load_model
    from dit_jax.train.export import load_ema_model

    loaded = load_model(args.run)
    _, config, _ = load_ema_model(args.run)
    cfg = config.train.sample_cfg_scale if args.cfg_scale is None else args.cfg_scale
    labels = np.repeat(np.arange(loaded.model.num_classes), args.per_class)
    keys = example_keys(0, np.arange(len(labels)))
    rows = []
    print(f"{loaded.name}: {len(labels)} samples per setting, cfg {cfg}, {jax.devices()[0].platform}")
    print(f"{'sampler':>12} {'steps':>5} {'FD':>7} {'accuracy':>8} {'s/100 img':>9}")
    for sampler, steps in SETTINGS:
        s = Sampler(loaded.model, SampleSettings(sampler=sampler, num_steps=steps, cfg_scale=cfg, cfg_channels=None,
                                                 clip_denoised=loaded.clip_denoised))
        jax.block_until_ready(s(labels[:2], keys[:2]))  # compile the small batch...
        jax.block_until_ready(s(labels, keys))  # ... and the full one
        t0 = time.perf_counter()
        x = np.asarray(jax.block_until_ready(s(labels, keys)))
        seconds = time.perf_counter() - t0
        q = sample_quality(to_uint8(np.clip(x, -1, 1)), labels, loaded.image_size)
        row = dict(sampler=sampler, steps=steps, digits_fd=round(q["digits_fd"], 3),
                   accuracy=round(q["sample_accuracy"], 4), seconds_per_100=round(100 * seconds / len(labels), 3))
        rows.append(row)
        print(f"{sampler:>12} {steps:>5} {row['digits_fd']:>7.2f} {row['accuracy']:>8.1%} "
              f"{row['seconds_per_100']:>9.2f}", flush=True)
    print(f"real digits, two halves: FD {q['real_split_fd']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(run=loaded.name, cfg_scale=cfg, n=len(labels), rows=rows,
                           real_split_fd=q["real_split_fd"]), f, indent=2)


if __name__ == "__main__":
    main()
