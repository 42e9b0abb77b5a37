"""`dit-jax sample-ddt`: a class-conditional PNG grid from a DDT checkpoint, with optional encoder sharing.

    dit-jax sample-ddt --ckpt DDT-XL-22en6de-R256.ckpt --labels 207,360,387,974 --out ddt.png
    dit-jax sample-ddt --ckpt DDT-XL-22en6de-R256.ckpt --schedule ddt_xl_250_k62.json     # shared encoder
    dit-jax sample-ddt --ckpt DDT-XL-22en6de-R256.ckpt --num-samples 50000 --sample-dir samples   # for FID
    dit-jax evaluate samples/DDT-XL-2-size-256-vae-ema-cfg-2.0-steps-250-encoder-250-seed-0.npz VIRTUAL_imagenet256_labeled.npz

Defaults are the paper's headline sampler (MCG-NJU/DDT configs): Euler, 250 steps on linspace(0, 0.96, 250) + [1],
CFG 2.0 at 256 px (3.0 at 512 px) only where 0.3 < t < 1, on every channel; sd-vae-ft-ema to decode. --schedule
takes a file from `dit-jax ddt-schedule` (or --refresh-rate R for uniform sharing); without either the encoder
runs every step. --random-init samples an untrained DDT (a smoke run; with --vae a local diffusers folder nothing is
downloaded). --ckpt also takes a dit-jax training run trained with objective=flow (configs/ddt_imagenet.py, or a
SiT-style DiT): its EMA weights (--which model: the trained ones), image size, VAE and flow.time_scale come from the
run; a model without a condition encoder samples with the same Euler loop and no sharing.

    dit-jax sample-ddt --ckpt runs/ddt --refresh-rate 4 --out ddt-run.png

--num-samples N writes N samples for FID instead of a grid, exactly as `dit-jax sample-fid` does for DiT: class-
balanced shuffled labels, example i's noise from fold_in(key(seed), i), resumable shards under --sample-dir, then
`<folder>.npz` (arr_0 uint8 NHWC) for the ADM evaluator (`dit-jax evaluate`). Several processes (a pod, or
--coordinator/--num-processes/--process-id) split the shards as `sample-fid` does and write the same .npz as one
process with the same --per-device-batch; a grid is written by process 0 only.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax

from dit_jax import distributed
from dit_jax.diffusion import flow
from dit_jax.diffusion.sharing import load_schedule, uniform_schedule
from dit_jax.errors import UsageError
from dit_jax.images import make_grid, save_png
from dit_jax.sample import data_mesh
from dit_jax.paths import check_input_file, check_output_file, check_output_folder
from dit_jax.sample_cli import (Decoder, check_checkpoint_arg, check_vae_arg, label_list, load_decoder, parse_labels,
                                vae_name)
from dit_jax.sample_ddt import DEFAULT_VARIANT, KeyedDDTSampler, load_flow_model, make_flow_sampler

# defaults of the flags that apply to one mode only (None in the parser, so that a flag given in the other mode is
# an error instead of being ignored)
GRID_DEFAULTS = dict(out="sample_ddt.png", nrow=4)
FID_DEFAULTS = dict(per_device_batch=32, sample_dir="samples")


def schedule_from_args(args: argparse.Namespace) -> list[int] | None:
    if args.schedule:
        schedule, meta = load_schedule(args.schedule)
        if meta.get("num_steps", args.steps) != args.steps:
            raise ValueError(f"{args.schedule} was computed for {meta['num_steps']} steps, not --steps {args.steps}: "
                             f"pass --steps {meta['num_steps']}, or compute a schedule for {args.steps} steps "
                             "(dit-jax ddt-schedule)")
        return schedule
    if args.refresh_rate:
        return uniform_schedule(args.steps, args.refresh_rate)
    return None


def check_flow_args(num_steps: int, cfg_scale: float | None, interval_min: float, interval_max: float, shift: float,
                    last_step: float, *, steps_flag: str = "--steps") -> None:
    """UsageError for flow-sampler settings no model can sample with (shared with `dit-jax ddt-schedule`)."""
    if num_steps < 1:
        raise UsageError(f"{steps_flag} {num_steps}: expected a positive number of sampling steps (DDT: 250)")
    if cfg_scale is not None and not (math.isfinite(cfg_scale) and cfg_scale >= 0):
        raise UsageError(f"--cfg-scale {cfg_scale}: expected a finite number >= 0 (1 = no guidance)")
    if not (math.isfinite(interval_min) and math.isfinite(interval_max) and interval_min < interval_max):
        raise UsageError(f"--interval-min {interval_min} --interval-max {interval_max}: guidance applies where "
                         "interval-min < t < interval-max, so interval-min must be below interval-max (DDT: 0.3, 1.0)")
    if not (math.isfinite(shift) and shift > 0):
        raise UsageError(f"--shift {shift}: expected a number > 0 (1 = no time shift)")
    if not 0 < last_step <= 1:
        raise UsageError(f"--last-step {last_step}: expected a number in (0, 1] (DDT: 0.04)")


def check_model_args(ckpt: str | None, flag: str, *, random_init: bool, which: str | None,
                     variant: str | None) -> None:
    """The model a flow command (`sample-ddt`, `ddt-schedule`) samples: a checkpoint or training run (`flag`), or
    --random-init, with the --which and --variant that apply to it. UsageError for flags that do not apply
    together or a --variant that names no DDT (the released ones: MCG-NJU/DDT configs), ValueError for a checkpoint
    no loader reads."""
    from dit_jax.models.ddt import DDT_models

    if random_init and ckpt:
        raise UsageError(f"--random-init samples an untrained model and would ignore {flag}: give one of them")
    if not random_init and not ckpt:
        raise UsageError(f"give a DDT checkpoint or a dit-jax flow training run ({flag}), or --random-init for an "
                         "untrained model (smoke runs)")
    if random_init and which is not None:
        raise UsageError("--which chooses the EMA or trained weights of a checkpoint; --random-init has none")
    if variant is not None and variant not in DDT_models:
        raise UsageError(f"--variant {variant}: unknown DDT variant; expected one of {', '.join(DDT_models)}")
    if ckpt:
        check_checkpoint_arg(ckpt, flag, folders=False)
        if variant is not None:
            from dit_jax.train.export import is_training_run

            if is_training_run(ckpt):
                raise ValueError(f"--variant does not apply to {ckpt}: a training run's architecture comes from its "
                                 "config; drop --variant")


def check_args(args: argparse.Namespace) -> None:
    """UsageError for flags that are invalid or do not apply together (before anything is loaded), then the
    paths: ValueError for a --ckpt, --vae or --schedule no loader reads."""
    check_flow_args(args.steps, args.cfg_scale, args.interval_min, args.interval_max, args.shift, args.last_step)
    if args.schedule and args.refresh_rate:
        raise UsageError("give --schedule or --refresh-rate, not both")
    if args.refresh_rate < 0:
        raise UsageError(f"--refresh-rate {args.refresh_rate}: expected the encoder every R >= 1 steps (0: every step)")
    fid = args.num_samples is not None
    if fid:
        from dit_jax.sample_fid import check_counts

        check_counts(args.num_samples, args.per_device_batch or 1)
        given = [f"--{k.replace('_', '-')}" for k in ("labels", *GRID_DEFAULTS) if getattr(args, k) is not None]
        if given:
            raise UsageError(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} to a grid only; "
                             "--num-samples writes class-balanced samples for FID into --sample-dir: drop "
                             + ("them" if len(given) > 1 else "it") + " or --num-samples")
    else:
        given = [f"--{k.replace('_', '-')}" for k in FID_DEFAULTS if getattr(args, k) is not None]
        given += ["--overwrite"] if args.overwrite else []
        if given:
            raise UsageError(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} to FID mode only "
                             "(--num-samples N): add --num-samples or drop " + ("them" if len(given) > 1 else "it"))
        if args.nrow is not None and args.nrow < 1:
            raise UsageError(f"--nrow {args.nrow}: expected a positive number of images per row")
        if args.labels is not None:
            label_list(args.labels)  # the form now; the range once the model is known
    for k, v in (GRID_DEFAULTS if not fid else FID_DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    check_model_args(args.ckpt, "--ckpt", random_init=args.random_init, which=args.which, variant=args.variant)
    args.which = args.which or "ema"  # (recorded in an FID folder's manifest)
    if args.vae:
        check_vae_arg(args.vae)
    if args.schedule:
        check_input_file(args.schedule, "--schedule", hint="give a schedule JSON written by `dit-jax ddt-schedule`")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    check_args(args)
    distributed.from_args(args)  # before any other JAX call
    fid = args.num_samples is not None
    if fid:
        check_output_folder(args.sample_dir, "--sample-dir")
    elif jax.process_index() == 0:  # the one writer of the grid
        check_output_file(args.out, "--out")
    loaded = load_flow_model(args.ckpt, variant=args.variant or DEFAULT_VARIANT, image_size=args.image_size,
                             which=args.which, random_init=args.random_init, seed=args.seed)
    model = loaded.model
    labels = parse_labels(args.labels, model.num_classes)
    cfg = args.cfg_scale if args.cfg_scale is not None else (3.0 if loaded.image_size == 512 else 2.0)
    settings = flow.FlowSampleSettings(num_steps=args.steps, cfg_scale=cfg, interval_min=args.interval_min,
                                       interval_max=args.interval_max, shift=args.shift, last_step=args.last_step)
    sampler = make_flow_sampler(model, settings, schedule_from_args(args), time_scale=loaded.time_scale)
    mesh = data_mesh(jax.local_devices() if fid else jax.local_devices()[:1])
    vae = vae_name(loaded, args.vae, "ema")
    decoder = load_decoder(loaded, vae, mesh, cache_dir=args.cache_dir, offline=args.offline)
    calls = len(sampler.schedule)
    what = f"{args.num_samples:,} images for FID" if fid else f"{len(labels)} images"
    encoder = (f"encoder on {calls} of {args.steps} steps" if getattr(model, "num_encoder_blocks", 0)
               else "no condition encoder")
    print(f"{distributed.process_tag()}sampling {what} from {loaded.name} (Euler, {args.steps} steps, cfg {cfg} in "
          f"({args.interval_min}, {args.interval_max}), {encoder})", flush=True)
    if fid:
        return _run_fid(args, loaded, vae, sampler, settings, decoder, mesh, t0)
    side = model.input_size
    noise = jax.random.normal(jax.random.key(args.seed), (len(labels), side, side, model.in_channels))
    t1 = time.perf_counter()
    latents = sampler(labels, noise)
    images = decoder(latents)
    t2 = time.perf_counter()
    if jax.process_index() != 0:  # every process sampled the same grid; the first one writes it
        return 0
    upscale = max(1, 64 // images.shape[1])  # tiny pixel-space samples are enlarged to be visible
    out = save_png(make_grid(images, nrow=args.nrow), args.out, upscale=upscale)
    print(f"wrote {out.resolve()} ({len(labels)} images, labels {labels.tolist()}); sampling {t2 - t1:.1f}s, "
          f"total {time.perf_counter() - t0:.1f}s")
    return 0


def _run_fid(args: argparse.Namespace, loaded: Any, vae: str, sampler: Any, settings: flow.FlowSampleSettings,
             decoder: Decoder, mesh: Any, t0: float) -> int:
    """--num-samples: dit_jax.sample_fid's resumable shards and .npz, with a DDT (or plain flow) sampler."""
    from dit_jax.sample_fid import sample_fid

    sharing = f"encoder-{len(sampler.schedule)}"
    folder = Path(args.sample_dir) / (f"{loaded.name}-size-{loaded.image_size}-vae-{Path(vae).name}-"
                                      f"cfg-{float(settings.cfg_scale)}-steps-{settings.num_steps}-{sharing}-"
                                      f"seed-{args.seed}")
    manifest = dict(model=loaded.name, ckpt=None if args.random_init else Path(args.ckpt).name, which=args.which,
                    image_size=loaded.image_size, vae=vae, time_scale=loaded.time_scale,
                    settings=dataclasses.asdict(settings), schedule=sampler.schedule)
    out = sample_fid(KeyedDDTSampler(sampler, loaded.model, mesh), decoder, folder, num_samples=args.num_samples,
                     seed=args.seed, shard_size=args.per_device_batch * mesh.size, manifest=manifest,
                     overwrite=args.overwrite, progress=args.progress)
    if out is not None:
        print(f"wrote {out.resolve()} (arr_0: {args.num_samples:,} uint8 images); encoder ran {sampler.encoder_calls} "
              f"times; total {time.perf_counter() - t0:.0f}s")
    return 0


def register(sub: Any, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="DDT checkpoint (MCG-NJU Lightning .ckpt/.pt, or .safetensors), or a dit-jax "
                   "training run trained with objective=flow (a DDT or a SiT-style DiT; its EMA weights)")
    p.add_argument("--variant", help=f"DDT-S/2 | DDT-B/2 | DDT-L/2 | DDT-XL/2 of a checkpoint or --random-init "
                   f"(default {DEFAULT_VARIANT}; a training run's comes from its config)")
    p.add_argument("--which", choices=("ema", "model"), help="ema_denoiser (default) or denoiser")
    p.add_argument("--random-init", action="store_true", help="an untrained model (smoke runs)")
    p.add_argument("--image-size", type=int, choices=(256, 512), default=None,
                   help="256 (default) or 512 for a checkpoint; a training run's own size otherwise")
    p.add_argument("--labels", help="comma-separated class ids (default: the official DiT sample.py's 8 classes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--cfg-scale", type=float, default=None, help="default 2.0 at 256 px, 3.0 at 512 px; 1 = off")
    p.add_argument("--interval-min", type=float, default=0.3)
    p.add_argument("--interval-max", type=float, default=1.0)
    p.add_argument("--shift", type=float, default=1.0, help="timeshift t/(t+(1-t) shift)")
    p.add_argument("--last-step", type=float, default=0.04)
    p.add_argument("--schedule", help="encoder-sharing schedule JSON from `dit-jax ddt-schedule`")
    p.add_argument("--refresh-rate", type=int, default=0, help="uniform sharing: the encoder every R steps")
    p.add_argument("--vae", help="ema | mse | a local diffusers VAE folder (default: a training run's own, else ema)")
    p.add_argument("--cache-dir", help="weights cache (default $DIT_JAX_CACHE or ~/.cache/dit_jax)")
    p.add_argument("--offline", action="store_true", default=None, help="never download; use the cache only")
    p.add_argument("--out", help=f"the PNG grid to write (default {GRID_DEFAULTS['out']})")
    p.add_argument("--nrow", type=int, help=f"images per grid row (default {GRID_DEFAULTS['nrow']})")
    p.add_argument("--num-samples", type=int, help="FID mode: N samples into <sample-dir>/<run>.npz, not a grid")
    p.add_argument("--per-device-batch", type=int,
                   help=f"FID mode: samples per device per call (default {FID_DEFAULTS['per_device_batch']})")
    p.add_argument("--sample-dir", help="FID mode: parent of the shard folder and the .npz (default "
                   f"{FID_DEFAULTS['sample_dir']})")
    p.add_argument("--overwrite", action="store_true", help="FID mode: discard shards made with other settings")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    distributed.add_arguments(p)
    p.set_defaults(func=run)
    return p


if __name__ == "__main__":  # pragma: no cover
    from dit_jax.cli import main

    sys.exit(main(["sample-ddt", *sys.argv[1:]]))
