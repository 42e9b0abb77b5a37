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
from typing import Any

import jax
import numpy as np

REPO_CONFIG = "configs/digits.py"


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    p = subparsers.add_parser(name)
    p.add_argument("--workdir", default="runs/digits", help="output folder (default: runs/digits)")
    p.add_argument("--config", default=REPO_CONFIG, help=f"config file (default: {REPO_CONFIG})")
    p.add_argument("--per-class", type=int, default=20, help="samples per class (default 20)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    p.set_defaults(func=run, accepts_overrides=True)


def check_demo_config(config: Any, spec: str) -> None:
    """The demo trains on the digits, then samples every class with guidance and scores the samples with a digits
    classifier: raise UsageError (naming the key) for a config it cannot do that with."""
    from dit_jax.errors import UsageError

    problems = []
    if config.data.source != "digits":
        problems.append(f"data.source={config.data.source!r}: the demo trains and scores the digits "
                        f"(data.source='digits'); train other configs with `dit-jax train --config {spec}`")
    t = config.train
    if t.sample_cfg_scale != 1 and config.model.class_dropout_prob == 0:
        problems.append(f"train.sample_cfg_scale={t.sample_cfg_scale} needs model.class_dropout_prob > 0 "
                        f"(guidance uses the null class, which a model trained without label dropout lacks): set "
                        f"train.sample_cfg_scale=1")
    if config.objective == "diffusion" and not 1 <= t.sample_steps <= config.diffusion.diffusion_steps:
        problems.append(f"train.sample_steps={t.sample_steps} must be in [1, diffusion.diffusion_steps="
                        f"{config.diffusion.diffusion_steps}] (the demo samples after training)")
    elif t.sample_steps < 1:
        problems.append(f"train.sample_steps={t.sample_steps} must be >= 1 (the demo samples after training)")
    if problems:
        raise UsageError("config cannot run as the demo: " + "; ".join(problems))


def run(args: argparse.Namespace) -> int:
    from dit_jax.errors import UsageError
    from dit_jax.evaluate.digits_classifier import sample_accuracy
    from dit_jax.images import make_grid, save_png
    from dit_jax.train.cli import load_run_config
    from dit_jax.train.loop import sample_grid, train
    from dit_jax.train.optim import ema_params

    t_start = time.perf_counter()
    overrides = list(args.overrides or [])
    if args.per_class < 1:
        raise UsageError(f"--per-class {args.per_class}: must be >= 1 (samples per class)")
    for key in ("train.sample_per_class", "train.sample_num_classes"):
        if any(o.split("=", 1)[0] == f"--config.{key}" for o in overrides):
            raise UsageError(f"--config.{key} does not apply to the demo, which samples every class: use --per-class")
    config = load_run_config(args.config, overrides, args.workdir, check=lambda c: check_demo_config(c, args.config))
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
