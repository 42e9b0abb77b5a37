"""The demo (`dit-jax demo`, what `make demo` runs; the command is dit_jax/train/cli.py): train a small DiT on the
bundled digits, then sample every class and score the samples.

    check_demo_config(config, spec)                  UsageError for a config the demo cannot run
    run_demo(config, workdir, per_class=20, seed=0)  train (or resume), sample, score, write; returns the report

configs/digits.py (scikit-learn's 8x8 digits upsampled to 16x16, one channel, ten classes, pixel space) trains
into the workdir; then per_class samples per class are drawn from the EMA weights with classifier-free guidance,
and it writes:
  samples.png  one row per class        samples.npz  images uint8 (N, 16, 16, 1), labels (N,)
  loss.png     the training loss and, beside it, the sample quality measured during training (train.eval_every)
  tb/          TensorBoard events; metrics.jsonl; checkpoints/
  demo.json    the report (steps, loss, times, the digits classifier's accuracy on real digits and on the samples,
               the samples' Frechet distance to the real digits in a digits MLP's feature space, and both
               measured during training)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dit_jax.errors import UsageError


def check_demo_config(config: Any, spec: str) -> None:
    """The demo trains on the digits, then samples every class with guidance and scores the samples with a digits
    classifier: raise UsageError (naming the key) for a config it cannot do that with. spec: the --config given."""
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


def run_demo(config: Any, workdir: str | Path, *, per_class: int = 20, seed: int = 0,
             t_start: float | None = None) -> dict[str, Any]:
    """Train `config` (checked: check_demo_config) into `workdir` (or resume it), sample `per_class` samples of
    every class with `seed`, score them, write the files listed above and print a summary; returns the report
    written to demo.json. t_start: time.perf_counter() when the command started (the times reported count from
    it; default now)."""
    from dit_jax.evaluate.digits_classifier import sample_quality
    from dit_jax.images import make_grid, save_png
    from dit_jax.train.loop import train
    from dit_jax.train.metrics import read_jsonl
    from dit_jax.train.optim import ema_params
    from dit_jax.train.samples import sample_grid

    t_start = time.perf_counter() if t_start is None else t_start
    workdir = Path(workdir)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}; training "
          f"{config.train.steps} steps of batch {config.train.global_batch} into {workdir}/", flush=True)
    summary = train(config, workdir)
    t_train = time.perf_counter() - t_start

    with config.unlocked():
        config.train.sample_per_class = per_class
        config.train.sample_num_classes = config.model.num_classes
    state = summary["state"]
    labels, images = sample_grid(summary["graphdef"], ema_params(state["opt_state"]), state["rest"], config,
                                 jax.random.key(seed))
    png = save_png(make_grid(images, nrow=per_class), workdir / "samples.png", upscale=4)
    np.savez(workdir / "samples.npz", images=images, labels=labels.astype(np.int32))
    scores = sample_quality(images, labels, config.data.image_size)
    curve = quality_curve(read_jsonl(workdir / "metrics.jsonl"))
    total = time.perf_counter() - t_start
    report = dict(steps=summary["step"], final_loss=summary["metrics"].get("loss"), train_seconds=round(t_train, 1),
                  total_seconds=round(total, 1), n_samples=int(len(labels)), cfg_scale=config.train.sample_cfg_scale,
                  sampler=config.train.sample_sampler, sample_steps=config.train.sample_steps, **scores,
                  quality_during_training=curve)
    (workdir / "demo.json").write_text(json.dumps(report, indent=2))
    print(f"\nclassifier trained on real digits: {scores['real_test_accuracy']:.1%} on held-out real digits, "
          f"{scores['sample_accuracy']:.1%} on the {len(labels)} samples (worst class "
          f"{scores['worst_class_accuracy']:.0%})")
    print(f"Frechet distance to the real digits (a digits MLP's features, dit_jax/evaluate/digits_classifier.py): "
          f"{scores['digits_fd']:.2f} (two halves of the real digits: {scores['real_split_fd']:.2f})")
    if curve:
        n = config.train.eval_num_samples
        print(f"quality during training ({n} EMA samples every {config.train.eval_every} steps; loss.png plots it):")
        print("   step  digits FD  accuracy")
        for row in curve:
            print(f"{row['step']:>7}  {row['digits_fd']:>9.2f}  {row['digits_accuracy']:>8.1%}")
    print(f"wrote {png}  (one row per class)")
    print(f"      {summary['loss_png']} (loss{' and sample quality' if curve else ''} against step)")
    print(f"      {workdir / 'samples.npz'}, {workdir / 'tb'}, {workdir / 'checkpoints'}")
    print(f"demo finished in {total:.0f}s")
    return report


def quality_curve(records: list[dict]) -> list[dict[str, float]]:
    """The digits quality logged during training (train.eval_every), one row per step ({"step", "digits_fd",
    "digits_accuracy"}), the latest of a step a resumed run logged twice, by step."""
    rows = {int(r["step"]): r for r in records if "digits_fd" in r}
    return [dict(step=s, digits_fd=float(rows[s]["digits_fd"]), digits_accuracy=float(rows[s]["digits_accuracy"]))
            for s in sorted(rows)]
