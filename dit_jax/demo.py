"""`dit-jax demo` (what `make demo` runs): train a small DiT on the bundled digits on the CPU, then sample.

Trains configs/digits.py (scikit-learn's 8x8 digits upsampled to 16x16, one channel, ten classes, pixel space)
into runs/digits/, then draws samples_per_class samples per class from the EMA weights with classifier-free
guidance and writes:
  samples.png  one row per class        samples.npz  images uint8 (N, 16, 16, 1), labels (N,)
  loss.png     the training loss        tb/          TensorBoard events; metrics.jsonl; checkpoints/
It scores the samples with a classifier trained on the real digits. Re-running resumes (or just re-samples).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

REPO_CONFIG = "configs/digits.py"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="train a small DiT on the bundled digits (CPU, a few minutes) and sample")
    p.add_argument("--workdir", default="runs/digits", help="output folder (default: runs/digits)")
    p.add_argument("--config", default=REPO_CONFIG, help=f"config file (default: {REPO_CONFIG})")
    p.add_argument("--per-class", type=int, default=20, help="samples per class (default 20)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    p.set_defaults(func=run, accepts_overrides=True)


def run(args: argparse.Namespace) -> int:
    from dit_jax.evaluate.digits_classifier import sample_accuracy
    from dit_jax.images import make_grid, save_png
    from dit_jax.train.config_io import load_config
    from dit_jax.train.loop import sample_grid, train
    from dit_jax.train.optim import ema_params

    t_start = time.perf_counter()
    config = load_config(args.config, list(args.overrides or []))
    workdir = Path(args.workdir)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}; training "
          f"{config.train.steps} steps of batch {config.train.global_batch} into {workdir}/", flush=True)
    summary = train(config, workdir)
    t_train = time.perf_counter() - t_start

    with config.unlocked():
        config.train.sample_per_class = args.per_class
        config.train.sample_num_classes = config.model.num_classes
    state = summary["state"]
    labels, images = sample_grid(summary["graphdef"], ema_params(state["opt_state"]), state["rest"], config,
                                 jax.random.key(args.seed))
    png = save_png(make_grid(images, nrow=args.per_class), workdir / "samples.png", upscale=4)
    np.savez(workdir / "samples.npz", images=images, labels=labels.astype(np.int32))
    scores = sample_accuracy(images, labels, config.data.image_size)
    total = time.perf_counter() - t_start
    report = dict(steps=summary["step"], final_loss=summary["metrics"].get("loss"), train_seconds=round(t_train, 1),
                  total_seconds=round(total, 1), n_samples=int(len(labels)), cfg_scale=config.train.sample_cfg_scale,
                  sample_steps=config.train.sample_steps, **scores)
    (workdir / "demo.json").write_text(json.dumps(report, indent=2))
    print(f"\nclassifier trained on real digits: {scores['real_test_accuracy']:.1%} on held-out real digits, "
          f"{scores['sample_accuracy']:.1%} on the {len(labels)} samples (worst class "
          f"{scores['worst_class_accuracy']:.0%})")
    print(f"wrote {png}  (one row per class)")
    print(f"      {workdir / 'samples.npz'}, {summary['loss_png']}, {workdir / 'tb'}, {workdir / 'checkpoints'}")
    print(f"demo finished in {total:.0f}s")
    return 0
