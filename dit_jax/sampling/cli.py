"""The sampling commands: `dit-jax sample` (a PNG grid), `sample-fid` (N samples into the ADM evaluator's .npz),
`ddt-schedule` (DDT's encoder-sharing schedule); `sample-ddt` is another name for `sample`. All four read any model
(a training run of any objective, the official DiT-XL/2, a `dit-jax convert` folder, an official .pt, a diffusers
folder, a released DDT .ckpt, or --random-init) through dit_jax.sampling.load and take the same flags:

    dit-jax sample                                          # DiT-XL/2 256 px, the official sample.py's 8 classes
    dit-jax sample --image-size 512 --labels 88,279 --cfg-scale 4 --seed 1 --out macaws.png
    dit-jax sample --ckpt runs/my_run --sampler ddim --steps 50          # a training run's EMA weights
    dit-jax sample --ckpt runs/my_flow_run --sampler heun --steps 50     # a run trained with objective=flow
    dit-jax sample --ckpt DDT-XL-22en6de-R256.ckpt --schedule schedule.json --labels 207,360 --out ddt.png
    dit-jax sample-fid --ckpt runs/my_run --num-samples 50000 --sample-dir samples
    dit-jax ddt-schedule --ckpt DDT-XL-22en6de-R256.ckpt --steps 250 --refresh-rate 4 --out schedule.json

--sampler: ddpm | ddim | dpmsolver++ for a model trained with Gaussian diffusion (DiT; default ddpm, 250 steps),
euler | heun | euler_maruyama for a velocity model (objective=flow: DDT, or a SiT-style DiT; default euler on
DDT's grid: guidance in (0.3, 1), last step 0.04). A DDT's condition encoder can be shared between steps
(--schedule from `ddt-schedule`, or --refresh-rate R: every R steps). Latent models are decoded with the SD VAE
(--vae ema|mse|folder; the official sample.py's default is mse, sample_ddp.py's ema); pixel-space runs need none.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dit_jax import distributed
from dit_jax.constants import VAE_DOWNSAMPLE
from dit_jax.errors import UsageError
from dit_jax.paths import (check_input_exists, check_input_file, check_input_folder, check_output_file,
                           check_output_folder)

# DDT's sampling defaults (MCG-NJU/DDT configs): guidance only in (0.3, 1), the grid's last step 0.04
FLOW_DEFAULTS = dict(interval_min=0.3, interval_max=1.0, shift=1.0, last_step=0.04)
FLOW_FLAGS = ("interval_min", "interval_max", "shift", "last_step", "schedule", "refresh_rate")
MODES = {  # per command: the guidance scale and VAE of a diffusion model when not given
    "sample": dict(cfg_scale=4.0, vae="mse"),  # the official sample.py
    "sample-ddt": dict(cfg_scale=4.0, vae="mse"),
    "sample-fid": dict(cfg_scale=1.5, vae="ema"),  # the official sample_ddp.py
    "ddt-schedule": dict(cfg_scale=None, vae=None),
}


# ----------------------------------------------------------------------------------------------------------
# Flags: the model, the sampler.
# ----------------------------------------------------------------------------------------------------------
def cfg_channels_arg(text: str) -> int | str | None:
    if text in ("all", "auto"):
        return None if text == "all" else text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cfg-channels takes an integer or 'all', got {text!r}") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    from dit_jax.models.families import DTYPES

    g = p.add_argument_group("the model")
    g.add_argument("--ckpt", "--checkpoint", dest="ckpt",
                   help="a training run (its EMA weights), a `dit-jax convert` folder, an official .pt, a diffusers "
                   "folder or a DDT .ckpt/.safetensors (default: the official DiT-XL/2 for --image-size, downloaded "
                   "once)")
    g.add_argument("--image-size", "--res", dest="image_size", type=int, default=None,
                   help="256 (default) or 512: the official DiT-XL/2 without --ckpt, or a DDT checkpoint's size; a "
                   "training run's and a DiT checkpoint's come from the checkpoint")
    g.add_argument("--variant", help="the size of a DDT checkpoint (default DDT-XL/2) or of --random-init, e.g. "
                   "DDT-S/2, DiT-S/2")
    g.add_argument("--which", choices=("ema", "model"), help="the EMA (default) or the trained weights")
    g.add_argument("--random-init", action="store_true", help="an untrained --variant (smoke runs)")
    g.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="compute dtype of the model")
    g.add_argument("--vae", help="ema | mse | a diffusers VAE folder (default: a training run's own, else the "
                   "command's)")
    g.add_argument("--cache-dir", help="weights cache (default $DIT_JAX_CACHE or ~/.cache/dit_jax)")
    g.add_argument("--offline", action="store_true", default=None, help="never download; use the cache only")


def add_sampler_args(p: argparse.ArgumentParser, *, sharing: bool = True) -> None:
    from dit_jax.diffusion.objectives import SAMPLERS

    g = p.add_argument_group("the sampler")
    g.add_argument("--sampler", choices=SAMPLERS, help="default: ddpm for a diffusion model, euler for a flow model")
    g.add_argument("--steps", "--num-steps", dest="steps", type=int, default=250, help="sampling steps (default "
                   "250; diffusion: respaced from 1000)")
    g.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (1 = off; default: DiT 4.0 for "
                   "sample, 1.5 for sample-fid; flow 2.0 at 256 px, 3.0 at 512 px)")
    g.add_argument("--cfg-channels", type=cfg_channels_arg, default="auto",
                   help="diffusion: eps channels guided, an integer or 'all' (default: 3 for latent models as the "
                   "official release, all for pixel-space runs)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0: deterministic)")
    g.add_argument("--interval-min", type=float, help="flow: guidance where interval-min < t < interval-max "
                   "(default 0.3)")
    g.add_argument("--interval-max", type=float, help="flow: (default 1.0)")
    g.add_argument("--shift", type=float, help="flow: time shift t/(t+(1-t) shift) (default 1)")
    g.add_argument("--last-step", type=float, help="flow: the grid's last step (default 0.04)")
    if sharing:
        g.add_argument("--schedule", help="DDT: encoder-sharing schedule JSON from `dit-jax ddt-schedule`")
        g.add_argument("--refresh-rate", type=int, default=0, help="DDT: uniform sharing, the encoder every R steps")


def check_vae_arg(vae: str) -> None:
    """--vae: a registry name (ema, mse, ...) or an existing folder."""
    from dit_jax.weights.registry import UnknownWeightsError, resolve_name

    try:
        resolve_name(vae, "vae")
        return
    except UnknownWeightsError:
        pass
    check_input_folder(vae, "--vae", hint="give ema, mse or a diffusers VAE folder (with config.json)")


def check_checkpoint_arg(ckpt: str, flag: str = "--ckpt") -> None:
    """ckpt must be something the loader reads: a training run, a checkpoint file (.pt/.pth/.bin/.ckpt or
    .safetensors), a converted or diffusers folder, or a registry name. Refused early with what it is and what is
    expected."""
    from dit_jax.convert.folder import CONFIG_FILE
    from dit_jax.convert.pt_reader import PT_SUFFIXES
    from dit_jax.train.export import checkpoint_dir, is_training_run
    from dit_jax.weights.registry import UnknownWeightsError, resolve_name

    suffixes = (*PT_SUFFIXES, ".safetensors")
    expected = (f"a training run, a `dit-jax convert` folder, a checkpoint file ({', '.join(suffixes)}) or a "
                "diffusers folder")
    if not Path(ckpt).expanduser().exists():
        try:
            resolve_name(ckpt, "dit")  # a registry name: downloaded
            return
        except UnknownWeightsError:
            pass
    path = check_input_exists(ckpt, flag, hint=f"expected {expected}")
    if path.is_file():
        if path.suffix not in suffixes:
            raise ValueError(f"{flag} {ckpt}: not a checkpoint file (suffix {path.suffix or 'none'!r}); "
                             f"expected {expected}")
        return
    if is_training_run(path):
        return
    if ((path / CONFIG_FILE).is_file() or (path / "config.json").is_file()
            or (path / "transformer" / "config.json").is_file()):
        return
    if checkpoint_dir(path).name == "checkpoints":
        raise ValueError(f"{flag} {ckpt}: a training run without a complete checkpoint yet (the trainer saves one "
                         "every train.ckpt_every steps)")
    raise ValueError(f"{flag} {ckpt}: a folder that is not {expected}")


def check_model_args(args: argparse.Namespace) -> None:
    """UsageError for model flags that are invalid or do not apply together, ValueError for a --ckpt or --vae no
    loader reads: all before anything is loaded (a sampling run can take hours)."""
    from dit_jax.models.families import FAMILIES

    known = [v for fam in FAMILIES.values() for v in fam.variants]
    if args.random_init and args.ckpt:
        raise UsageError("--random-init samples an untrained model and would ignore --ckpt: give one of them")
    if args.random_init and args.which is not None:
        raise UsageError("--which chooses the EMA or trained weights of a checkpoint; --random-init has none")
    if args.variant is not None and args.variant not in known:
        raise UsageError(f"--variant {args.variant}: unknown variant; expected one of {', '.join(known)}")
    if args.variant is not None and not args.ckpt and not args.random_init:
        raise UsageError("--variant chooses the size of a DDT checkpoint (--ckpt) or of --random-init: give one")
    if args.image_size is not None:
        if args.image_size <= 0 or args.image_size % VAE_DOWNSAMPLE:
            raise UsageError(f"--image-size {args.image_size}: expected a positive multiple of {VAE_DOWNSAMPLE} "
                             "(the VAE's downsampling), e.g. 256")
        from dit_jax.sampling.load import OFFICIAL_SIZES

        if not args.ckpt and not args.random_init and args.image_size not in OFFICIAL_SIZES:
            raise UsageError(f"--image-size {args.image_size}: the official DiT-XL/2 checkpoints are 256 or 512 px")
    if args.vae is not None:
        check_vae_arg(args.vae)
    if args.ckpt is not None:
        check_checkpoint_arg(args.ckpt)
        from dit_jax.train.export import is_training_run

        if args.variant is not None and is_training_run(args.ckpt):
            raise ValueError(f"--variant does not apply to {args.ckpt}: a training run's architecture comes from its "
                             "config; drop --variant")
    args.which = args.which or "ema"


def check_sampler_args(args: argparse.Namespace) -> None:
    """UsageError for sampler flags that no model can sample with (what needs the model is checked once loaded)."""
    from dit_jax.diffusion.objectives import objective_of_sampler

    if args.steps < 1:
        raise UsageError(f"--steps {args.steps}: expected a positive number of sampling steps (default 250)")
    if args.cfg_scale is not None and not (math.isfinite(args.cfg_scale) and args.cfg_scale >= 0):
        raise UsageError(f"--cfg-scale {args.cfg_scale}: expected a finite number >= 0 (1 = no guidance)")
    if args.eta != 0 and args.sampler != "ddim":
        raise UsageError(f"--eta {args.eta}: eta applies to the ddim sampler only; add --sampler ddim or drop --eta")
    if not 0 <= args.eta <= 1:  # also NaN; DDIM's eta goes from deterministic (0) to DDPM-like noise (1)
        raise UsageError(f"--eta {args.eta}: expected a number in [0, 1] (0: deterministic DDIM)")
    if args.cfg_channels != "auto":
        if args.cfg_scale == 1.0:
            raise UsageError("--cfg-channels applies to guidance only, which --cfg-scale 1 turns off: drop one")
        if args.cfg_channels is not None and args.cfg_channels < 1:
            raise UsageError(f"--cfg-channels {args.cfg_channels}: expected a positive number of channels or 'all'")
    lo = FLOW_DEFAULTS["interval_min"] if args.interval_min is None else args.interval_min
    hi = FLOW_DEFAULTS["interval_max"] if args.interval_max is None else args.interval_max
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise UsageError(f"--interval-min {lo} --interval-max {hi}: guidance applies where interval-min < t < "
                         "interval-max, so interval-min must be below interval-max (DDT: 0.3, 1.0)")
    if args.shift is not None and not (math.isfinite(args.shift) and args.shift > 0):
        raise UsageError(f"--shift {args.shift}: expected a number > 0 (1 = no time shift)")
    if args.last_step is not None and not 0 < args.last_step <= 1:
        raise UsageError(f"--last-step {args.last_step}: expected a number in (0, 1] (DDT: 0.04)")
    if getattr(args, "schedule", None) and getattr(args, "refresh_rate", 0):
        raise UsageError("give --schedule or --refresh-rate, not both")
    if getattr(args, "refresh_rate", 0) < 0:
        raise UsageError(f"--refresh-rate {args.refresh_rate}: expected the encoder every R >= 1 steps (0: every step)")
    if getattr(args, "schedule", None):
        check_input_file(args.schedule, "--schedule", hint="give a schedule JSON written by `dit-jax ddt-schedule`")
    if args.sampler is not None:
        objective = objective_of_sampler(args.sampler).name
        check_flags_apply(args, objective, f"--sampler {args.sampler}")
        if objective == "diffusion":
            check_steps(args.steps, args.sampler)


def check_steps(steps: int, sampler: str) -> None:
    """UsageError when a diffusion sampler cannot take `steps` (SampleSettings says why)."""
    from dit_jax.sampling.settings import SampleSettings

    try:
        SampleSettings(sampler=sampler, num_steps=steps)
    except ValueError as e:
        raise UsageError(f"--steps {steps} with --sampler {sampler}: {e}; choose another --steps") from e


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    return [f"--{k.replace('_', '-')}" for k in names if getattr(args, k, None) not in (None, 0, "")]


def check_flags_apply(args: argparse.Namespace, objective: str, why: str) -> None:
    """UsageError for sampler flags of the other objective (`why`: what decided the objective)."""
    if objective == "diffusion":
        bad = _given(args, FLOW_FLAGS)
        what = "a velocity (flow) model's"
    else:
        bad = _given(args, ("eta",)) + (["--cfg-channels"] if args.cfg_channels != "auto" else [])
        what = "a Gaussian diffusion model's"
    if bad:
        raise UsageError(f"{' and '.join(bad)} {'are' if len(bad) > 1 else 'is'} {what} sampler option"
                         f"{'s' if len(bad) > 1 else ''}, and {why} samples objective={objective}: drop "
                         + ("them" if len(bad) > 1 else "it"))


def settings_from_args(args: argparse.Namespace, loaded: Any, mode: str) -> Any:
    """The SampleSettings the flags give for this model (defaults by its objective and the command)."""
    from dit_jax.diffusion.objectives import objective, objective_of_sampler
    from dit_jax.diffusion.sharing import load_schedule, uniform_schedule
    from dit_jax.sampling.settings import SampleSettings

    obj = objective(loaded.objective)
    sampler = args.sampler or obj.default_sampler
    if objective_of_sampler(sampler).name != obj.name:
        raise UsageError(f"--sampler {sampler} integrates a model trained with objective="
                         f"{objective_of_sampler(sampler).name}, and {loaded.name} was trained with objective="
                         f"{obj.name}: choose one of {', '.join(obj.samplers)}")
    check_flags_apply(args, obj.name, f"{loaded.name} (trained with objective={obj.name})")
    if obj.name == "diffusion":
        check_steps(args.steps, sampler)
        cfg_channels = args.cfg_channels
        if cfg_channels == "auto":
            cfg_channels = None if loaded.pixel_space else 3
        elif cfg_channels is not None and cfg_channels > loaded.model.out_channels:
            raise ValueError(f"--cfg-channels {cfg_channels}: this model has {loaded.model.out_channels} output "
                             f"channels (guide at most that many, or 'all')")
        cfg = MODES[mode]["cfg_scale"] if args.cfg_scale is None else args.cfg_scale
        return SampleSettings(sampler=sampler, num_steps=args.steps, cfg_scale=cfg, cfg_channels=cfg_channels,
                              eta=args.eta, clip_denoised=loaded.clip_denoised)
    schedule = None
    if getattr(args, "schedule", None):
        schedule, meta = load_schedule(args.schedule)
        if meta.get("num_steps", args.steps) != args.steps:
            raise ValueError(f"{args.schedule} was computed for {meta['num_steps']} steps, not --steps {args.steps}: "
                             f"pass --steps {meta['num_steps']}, or compute a schedule for {args.steps} steps "
                             "(dit-jax ddt-schedule)")
    elif getattr(args, "refresh_rate", 0) and mode != "ddt-schedule":  # ddt-schedule's: the encoder calls to plan
        schedule = uniform_schedule(args.steps, args.refresh_rate)
    flow_kw = {k: FLOW_DEFAULTS[k] if getattr(args, k) is None else getattr(args, k) for k in FLOW_DEFAULTS}
    cfg = (3.0 if loaded.image_size == 512 else 2.0) if args.cfg_scale is None else args.cfg_scale
    return SampleSettings(sampler=sampler, num_steps=args.steps, cfg_scale=cfg, schedule=schedule, **flow_kw)


def load(args: argparse.Namespace) -> Any:
    from dit_jax.sampling.load import load_model

    return load_model(args.ckpt, image_size=args.image_size, variant=args.variant, which=args.which,
                      random_init=args.random_init, seed=args.seed, dtype=args.dtype, cache_dir=args.cache_dir,
                      offline=args.offline, progress=args.progress)


def vae_for(args: argparse.Namespace, loaded: Any, mode: str) -> str:
    from dit_jax.sampling.decode import vae_name

    return vae_name(loaded, args.vae, MODES[mode]["vae"] if loaded.objective == "diffusion" else "ema")


def describe(settings: Any, loaded: Any) -> str:
    s = settings
    if s.objective == "diffusion":
        return f"{s.sampler}, {s.num_steps} steps, cfg {s.cfg_scale}"
    encoder = ""
    if getattr(loaded.model, "num_encoder_blocks", 0):
        encoder = f", encoder on {s.encoder_calls or s.num_steps} of {s.num_steps} steps"
    return f"{s.sampler}, {s.num_steps} steps, cfg {s.cfg_scale} in ({s.interval_min}, {s.interval_max}){encoder}"


def label_list(text: str) -> list[int]:
    """--labels "207,360" -> [207, 360] (UsageError for anything else)."""
    try:
        labels = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UsageError(f"--labels must be comma-separated integers (class ids), got {text!r}") from None
    if not labels:
        raise UsageError("--labels is empty: give comma-separated class ids, e.g. --labels 207,360")
    return labels


def parse_labels(text: str | None, num_classes: int) -> np.ndarray:
    """"207,360" -> array; None -> the official sample.py's classes (or 0..min(8, classes)-1 for small models)."""
    from dit_jax.sampling.settings import OFFICIAL_LABELS

    if text is None:
        labels = list(OFFICIAL_LABELS) if num_classes == 1000 else list(range(min(8, num_classes)))
    else:
        labels = label_list(text)
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"--labels: {bad} are outside [0, {num_classes}) for this model ({num_classes} classes)")
    return np.asarray(labels, np.int32)


# ----------------------------------------------------------------------------------------------------------
# dit-jax sample (and its other name, sample-ddt)
# ----------------------------------------------------------------------------------------------------------
def run_sample(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    check_sampler_args(args)
    check_model_args(args)
    if args.nrow < 1:
        raise UsageError(f"--nrow {args.nrow}: expected a positive number of images per row")
    if args.labels is not None:
        label_list(args.labels)  # the form now; the range once the model is known
    check_output_file(args.out, "--out")
    if args.npz:
        check_output_file(args.npz, "--npz")
    import jax

    from dit_jax.images import make_grid, save_npz, save_png
    from dit_jax.sampling.decode import load_decoder
    from dit_jax.sampling.sampler import Sampler, data_mesh, example_keys

    loaded = load(args)
    labels = parse_labels(args.labels, loaded.model.num_classes)
    settings = settings_from_args(args, loaded, args.command)
    mesh = data_mesh(jax.local_devices())
    decoder = load_decoder(loaded, vae_for(args, loaded, args.command), mesh, cache_dir=args.cache_dir,
                           offline=args.offline, progress=args.progress)
    sampler = Sampler(loaded.model, settings, time_scale=loaded.time_scale, mesh=mesh)
    print(f"sampling {len(labels)} images from {loaded.name} ({describe(settings, loaded)}) on {mesh.size} "
          f"{jax.local_devices()[0].platform} device(s)", flush=True)
    t1 = time.perf_counter()
    latents = sampler(labels, example_keys(args.seed, np.arange(len(labels))), progress=args.progress)
    images = decoder(latents)
    t2 = time.perf_counter()
    upscale = max(1, 64 // images.shape[1])  # tiny pixel-space samples are enlarged to be visible
    out = save_png(make_grid(images, nrow=args.nrow), args.out, upscale=upscale)
    if args.npz:
        save_npz(args.npz, images=images, labels=labels)
    print(f"wrote {out.resolve()} ({len(labels)} images, labels {labels.tolist()}); "
          f"sampling {t2 - t1:.1f}s, total {time.perf_counter() - t0:.1f}s")
    return 0


# ----------------------------------------------------------------------------------------------------------
# dit-jax sample-fid
# ----------------------------------------------------------------------------------------------------------
def check_counts(num_samples: int, per_device_batch: int) -> None:
    """UsageError for a --num-samples or --per-device-batch below 1."""
    if num_samples < 1:
        raise UsageError(f"--num-samples {num_samples}: expected a positive number of samples (FID uses 50,000)")
    if per_device_batch < 1:
        raise UsageError(f"--per-device-batch {per_device_batch}: expected a positive number of samples per device")


def fid_folder(sample_dir: str, loaded: Any, vae: str, settings: Any, seed: int) -> Path:
    """`<sample-dir>/<model>-size-<px>-vae-<vae>-cfg-<scale>[-<flow sampler>-steps-<n>[-encoder-<k>]]-seed-<seed>`
    (the diffusion form is the official sample_ddp.py's folder name)."""
    extra = ""
    if settings.objective == "flow":
        extra = f"-{settings.sampler}-steps-{settings.num_steps}"
        if settings.schedule is not None:
            extra += f"-encoder-{len(settings.schedule)}"
    return Path(sample_dir) / (f"{loaded.name}-size-{loaded.image_size}-vae-{Path(vae).name}-"
                               f"cfg-{float(settings.cfg_scale)}{extra}-seed-{seed}")


def run_sample_fid(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    check_sampler_args(args)
    check_model_args(args)
    check_counts(args.num_samples, args.per_device_batch)
    distributed.from_args(args)  # before any other JAX call
    check_output_folder(args.sample_dir, "--sample-dir")
    import jax

    from dit_jax.sampling.decode import load_decoder
    from dit_jax.sampling.fid import sample_fid
    from dit_jax.sampling.sampler import Sampler, data_mesh

    loaded = load(args)
    settings = settings_from_args(args, loaded, "sample-fid")
    mesh = data_mesh(jax.local_devices())
    vae = vae_for(args, loaded, "sample-fid")
    decoder = load_decoder(loaded, vae, mesh, cache_dir=args.cache_dir, offline=args.offline, progress=args.progress)
    sampler = Sampler(loaded.model, settings, time_scale=loaded.time_scale, mesh=mesh)
    folder = fid_folder(args.sample_dir, loaded, vae, settings, args.seed)
    manifest = dict(model=loaded.name, image_size=loaded.image_size, vae=vae, which=args.which,
                    time_scale=loaded.time_scale, settings=dataclasses.asdict(settings), dtype=args.dtype)
    manifest = json.loads(json.dumps(manifest))  # as read back from manifest.json (a schedule tuple is a list there)
    where = f"{jax.process_count()} processes x {mesh.size}" if jax.process_count() > 1 else f"{mesh.size}"
    print(f"{distributed.process_tag()}sampling {args.num_samples:,} images from {loaded.name} "
          f"({describe(settings, loaded)}) into {folder}/ on {where} device(s)", flush=True)
    out = sample_fid(sampler, decoder, folder, num_samples=args.num_samples, seed=args.seed,
                     shard_size=args.per_device_batch * mesh.size, manifest=manifest, overwrite=args.overwrite,
                     progress=args.progress)
    if out is not None:
        calls = f"; the encoder ran {sampler.encoder_calls} times" if sampler.encoder_calls else ""
        print(f"wrote {out.resolve()} (arr_0 uint8 ({args.num_samples}, {loaded.image_size}, {loaded.image_size}, "
              f"C)){calls} in {time.perf_counter() - t0:.0f}s")
    return 0


# ----------------------------------------------------------------------------------------------------------
# dit-jax ddt-schedule
# ----------------------------------------------------------------------------------------------------------
def run_ddt_schedule(args: argparse.Namespace) -> int:
    from dit_jax.diffusion.sharing import save_schedule

    check_sampler_args(args)
    if args.sampler not in (None, "euler"):
        raise UsageError(f"--sampler {args.sampler}: encoder sharing runs the Euler sampler; drop --sampler")
    check_flags_apply(args, "flow", "ddt-schedule")
    check_model_args(args)
    if args.variant is not None:
        from dit_jax.models.families import FAMILIES

        if args.variant not in FAMILIES["ddt"].variants:  # found now, not after building (or reading) the model
            raise UsageError(f"--variant {args.variant}: not a DDT, so it has no condition encoder to share; "
                             f"ddt-schedule takes one of {', '.join(FAMILIES['ddt'].variants)}")
    n = args.steps
    if not (math.isfinite(args.refresh_rate) and args.refresh_rate >= 1):
        raise UsageError(f"--refresh-rate {args.refresh_rate}: expected a number >= 1 (steps / refresh_rate "
                         "encoder calls)")
    k = int(n / args.refresh_rate)  # the reference's num_recompute_timesteps
    if not 1 <= k <= n:
        raise UsageError(f"--refresh-rate {args.refresh_rate} gives {k} encoder calls for {n} steps: choose a "
                         f"refresh rate of at most {n}")
    if args.batch < 1:
        raise UsageError(f"--batch {args.batch}: expected a positive template batch (the reference uses 8)")
    check_output_file(args.out, "--out")
    from dit_jax.sampling.schedule import compute_schedule

    loaded = load(args)
    if not getattr(loaded.model, "num_encoder_blocks", 0):
        raise ValueError(f"{args.ckpt or args.variant} has no condition encoder to share (a DiT or single-stream "
                         "model): there is no schedule to compute; sample it with `dit-jax sample` without --schedule")
    if loaded.objective != "flow":
        raise ValueError(f"{loaded.name} was trained with objective={loaded.objective}; encoder sharing applies to "
                         "a DDT (objective=flow)")
    settings = settings_from_args(args, loaded, "ddt-schedule")
    out = compute_schedule(loaded.model, settings, k, batch=args.batch, seed=args.seed, time_scale=loaded.time_scale)
    save_schedule(args.out, out["schedule"], num_steps=n, num_recompute=k, cost=out["cost"],
                  uniform_cost=out["uniform_cost"], variant=loaded.name, checkpoint=args.ckpt or "random-init",
                  cfg_scale=settings.cfg_scale, interval=[settings.interval_min, settings.interval_max],
                  shift=settings.shift, last_step=settings.last_step, template_batch=args.batch, seed=args.seed)
    print(f"{k} encoder calls in {n} steps; DP cost {out['cost']:.4f} (uniform every {max(1, n // k)}: "
          f"{out['uniform_cost']:.4f}); schedule {out['schedule']}")
    print(f"saved {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# Parsers.
# ----------------------------------------------------------------------------------------------------------
def register(subparsers: Any, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_sampler_args(p, sharing=name != "ddt-schedule")
    p.add_argument("--seed", type=int, default=0, help="labels and noise (default 0)")
    if name == "ddt-schedule":
        p.add_argument("--refresh-rate", type=float, default=4.0, help="encoder calls = steps / refresh_rate")
        p.add_argument("--batch", type=int, default=8, help="template batch (the reference uses 8)")
        p.add_argument("--out", required=True, help="the schedule JSON to write")
        p.set_defaults(func=run_ddt_schedule, progress=False)
        return p
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    if name == "sample-fid":
        p.add_argument("--num-samples", type=int, default=50_000, help="default 50,000")
        p.add_argument("--per-device-batch", type=int, default=32, help="samples per device per call (default 32)")
        p.add_argument("--sample-dir", default="samples", help="parent folder of the shard folder and the .npz")
        p.add_argument("--overwrite", action="store_true", help="discard shards made with other settings")
        distributed.add_arguments(p)
        p.set_defaults(func=run_sample_fid)
        return p
    p.add_argument("--labels", help="comma-separated class ids (default: the official sample.py's 8 classes)")
    p.add_argument("--out", default="sample.png", help="PNG grid to write (default sample.png)")
    p.add_argument("--nrow", type=int, default=4, help="images per grid row (default 4, as sample.py)")
    p.add_argument("--npz", help="also save the uint8 images and labels to this .npz")
    p.set_defaults(func=run_sample)
    return p


if __name__ == "__main__":  # pragma: no cover
    from dit_jax.cli import main

    sys.exit(main(["sample", *sys.argv[1:]]))
