"""Steps against quality on a trained digits run (issue 19, item 4): every sampler at several step counts, scored by
the digits Frechet distance and classifier accuracy (dit_jax/evaluate/digits_classifier.py), with the time per 100
images (after compilation) on this machine.

    python bench/sampler_quality.py RUN [--per-class 20] [--json out.json] [--png docs/sampler_quality.png]

RUN: a digits training run (`dit-jax demo --workdir RUN` makes one). Every setting samples the same labels from
the same per-example keys (the same x_T for ddpm, ddim and dpmsolver++), with the run's guidance scale. --png draws
the table: Frechet distance and accuracy against the number of steps, one line per sampler (the README's picture).
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
    p.add_argument("--png", help="also draw FD and accuracy against steps into this PNG")
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
    if args.png:
        plot(rows, q["real_split_fd"], f"{loaded.name}, {len(labels)} samples, cfg {cfg}", args.png)
        print(f"wrote {args.png}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(run=loaded.name, cfg_scale=cfg, n=len(labels), rows=rows,
                           real_split_fd=q["real_split_fd"]), f, indent=2)


def plot(rows: list[dict], split_fd: float, title: str, png: str) -> None:
    """FD (left) and accuracy (right) against steps (log axis), one line per sampler; an atomic PNG write."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from dit_jax.paths import atomic_write
    from dit_jax.train.chart import COLORS

    fig = Figure(figsize=(11, 4.2), dpi=100, facecolor="white")
    FigureCanvasAgg(fig)
    ax_fd, ax_acc = fig.subplots(1, 2)
    for i, sampler in enumerate(dict.fromkeys(r["sampler"] for r in rows)):
        mine = sorted((r for r in rows if r["sampler"] == sampler), key=lambda r: r["steps"])
        steps = [r["steps"] for r in mine]
        color = tuple(c / 255 for c in COLORS[i % len(COLORS)])
        ax_fd.plot(steps, [r["digits_fd"] for r in mine], "o-", color=color, label=sampler)
        ax_acc.plot(steps, [100 * r["accuracy"] for r in mine], "o-", color=color, label=sampler)
    for ax, ylabel in ((ax_fd, "Frechet distance to the real digits (lower is better)"),
                       (ax_acc, "classifier accuracy on the samples (%)")):
        ax.set_xscale("log")
        ax.set_xticks([10, 15, 20, 25, 50, 100, 250])
        ax.set_xticklabels(["10", "15", "20", "25", "50", "100", "250"])
        ax.set_xlabel("sampling steps (model calls per image, x2 with guidance)")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(True, color="0.91")
        ax.legend(fontsize=9)
    ax_fd.set_title(f"sample quality against steps ({title})", fontsize=10, loc="left")
    fig.text(0.01, 0.01, f"two halves of the real digits: FD {split_fd:.2f}. An FD of a few hundred samples is "
             "biased upwards; at 200 samples one sample is 0.5 points of accuracy,\nand FDs within ~1 of each other "
             "are within the noise.", fontsize=8, color="0.4")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.canvas.draw()
    from PIL import Image

    rgb = np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    with atomic_write(png, "wb") as f:
        Image.fromarray(rgb).save(f, format="PNG")


if __name__ == "__main__":
    main()
