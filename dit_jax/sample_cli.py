"""`dit-jax sample`: a class-conditional PNG grid from the released DiT-XL/2 or your own checkpoint.

    dit-jax sample                                     # DiT-XL/2 256 px, the official sample.py's 8 classes
    dit-jax sample --image-size 512 --labels 88,279 --cfg-scale 4 --seed 1 --out macaws.png
    dit-jax sample --ckpt runs/my_run --sampler ddim --steps 50      # a training run's EMA weights
    dit-jax sample --ckpt out/dit-xl-2-256                             # a `dit-jax convert` folder

--ckpt takes a training workdir, a converted folder, an official .pt or a diffusers folder; without it the
official checkpoint for --image-size is downloaded (dit-jax download) and converted once into the cache.
Latent models are decoded with the SD VAE (--vae ema|mse|folder; sample.py's default is mse); pixel-space
runs (e.g. the digits demo) need none. The batch is sharded over every local device. A run trained with
objective=flow (a DDT, or a SiT-style DiT) is a velocity model: `dit-jax sample-ddt --ckpt RUN` samples it.
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
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dit_jax.errors import UsageError
from dit_jax.images import make_grid, save_npz, save_png, to_uint8
from dit_jax.models import DDT, DiT
from dit_jax.constants import SD_VAE_SCALE, VAE_DOWNSAMPLE
from dit_jax.models.vae import AutoencoderKL
from dit_jax.paths import check_input_exists, check_input_folder, check_output_file
from dit_jax.sample import OFFICIAL_LABELS, Sampler, SampleSettings, data_mesh, example_keys, pad_to_multiple

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class LoadedModel:
    """A model ready to sample, and how to turn its samples into pixels."""

    model: DiT | DDT  # a DDT (or a velocity DiT) for a flow run: load_model(..., objective="flow")
    name: str  # for folder names and logs, e.g. "DiT-XL-2-256x256" or "my_run-step0020000"
    pixel_space: bool  # True: samples are images in [-1, 1]; False: SD latents (decode with the VAE)
    image_size: int
    clip_denoised: bool  # pixel-space runs clip x_0 to [-1, 1] as the trainer's grids do; latents never
    vae: str | None = None  # the VAE a training run's latents came from (its config.data.vae)
    time_scale: float = 1.0  # a flow run's config.flow.time_scale: the model reads t * time_scale


def load_model(
    ckpt: str | None,
    *,
    image_size: int = 256,
    dtype: str = "float32",
    cache_dir: str | None = None,
    offline: bool | None = None,
    progress: bool = True,
    objective: str = "diffusion",
    use_ema: bool = True,
) -> LoadedModel:
    """The model to sample: a training run (EMA weights), any checkpoint `pretrained_dit` accepts, or (ckpt None)
    the official DiT-XL/2 for image_size 256 or 512. objective: what the calling sampler needs a training run to
    have been trained with ("diffusion": `sample`, `sample-fid`; "flow": `sample-ddt`)."""
    from dit_jax.train.export import is_training_run, load_ema_model

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {tuple(DTYPES)}")
    if ckpt is not None and is_training_run(ckpt):
        model, config, step = load_ema_model(ckpt, use_ema=use_ema, dtype=DTYPES[dtype])
        trained = str(config.objective)
        if trained != objective:
            how = "dit-jax sample-ddt" if trained == "flow" else "dit-jax sample (or sample-fid)"
            raise ValueError(f"{ckpt} was trained with objective={trained} and this command samples "
                             f"objective={objective} models; sample it with `{how} --ckpt {ckpt}`")
        pixel = config.data.source != "latents" and not config.data.vae
        size = config.data.image_size if pixel else model.input_size * VAE_DOWNSAMPLE
        vae = None if pixel else str(config.data.vae).removeprefix("stabilityai/")
        return LoadedModel(model, f"{Path(ckpt).resolve().name}-step{step:07d}", pixel, size, clip_denoised=pixel,
                           vae=vae, time_scale=float(config.flow.time_scale))
    if ckpt is None:
        if image_size not in (256, 512):
            raise ValueError(f"the official DiT-XL/2 checkpoints are 256 or 512 px, not {image_size}")
        ckpt = f"DiT-XL-2-{image_size}x{image_size}"
        name = ckpt
    else:
        name = Path(ckpt).name.removesuffix(".pt").removesuffix(".safetensors") or "ckpt"
    from dit_jax import weights

    model = weights.pretrained_dit(ckpt, cache_dir=cache_dir, offline=offline, progress=progress, dtype=DTYPES[dtype])
    return LoadedModel(model, name, False, model.input_size * VAE_DOWNSAMPLE, clip_denoised=False)


class Decoder:
    """Latents (n, h, w, 4) -> uint8 images (n, 8h, 8w, 3), batch-sharded, compiled once per padded size.
    As the official sample_ddp.py: vae.decode(z / 0.18215), then clamp(127.5 x + 128, 0, 255) truncated."""

    def __init__(self, vae: AutoencoderKL | None, mesh: jax.sharding.Mesh):
        self.mesh = mesh
        self.sharding = NamedSharding(mesh, P("data"))
        if vae is None:
            self.state = None
            return
        self.graphdef, state = nnx.split(vae)
        self.state = jax.device_put(state, NamedSharding(mesh, P()))
        self._decode = jax.jit(self._decode_impl, out_shardings=self.sharding)

    def _decode_impl(self, state: Any, z: jax.Array) -> jax.Array:
        x = nnx.merge(self.graphdef, state).decode(z / SD_VAE_SCALE)
        return jnp.clip(127.5 * x.astype(jnp.float32) + 128.0, 0, 255).astype(jnp.uint8)

    def __call__(self, samples: jax.Array | np.ndarray) -> np.ndarray:
        if self.state is None:  # pixel space
            return to_uint8(np.asarray(samples))
        n = samples.shape[0]
        (z,) = pad_to_multiple(self.mesh.size, jnp.asarray(samples))
        return np.asarray(self._decode(self.state, jax.device_put(z, self.sharding)))[:n]


def vae_name(loaded: LoadedModel, requested: str | None, default: str) -> str:
    """--vae if given, else the training run's VAE, else the command's default ("none" in pixel space, where
    --vae is an error: nothing would use it)."""
    if loaded.pixel_space:
        if requested:
            raise ValueError(f"{loaded.name} samples pixels (a run trained without a VAE); --vae does not apply: "
                             "drop it")
        return "none"
    return requested or loaded.vae or default


def load_decoder(loaded: LoadedModel, vae: str, mesh: jax.sharding.Mesh, **kw: Any) -> Decoder:
    if loaded.pixel_space:
        return Decoder(None, mesh)
    from dit_jax import weights

    return Decoder(weights.pretrained_vae(vae, **kw), mesh)


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
    if text is None:
        labels = list(OFFICIAL_LABELS) if num_classes == 1000 else list(range(min(8, num_classes)))
    else:
        labels = label_list(text)
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"--labels: {bad} are outside [0, {num_classes}) for this model ({num_classes} classes)")
    return np.asarray(labels, np.int32)


def cfg_channels_arg(text: str) -> int | str | None:
    if text in ("all", "auto"):
        return None if text == "all" else text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cfg-channels takes an integer or 'all', got {text!r}") from None


def add_common_args(p: argparse.ArgumentParser, *, cfg_scale: float, vae: str) -> None:
    """Flags shared by `sample` and `sample-fid` (defaults follow the official sample.py / sample_ddp.py)."""
    p.add_argument("--ckpt", help="training workdir, converted folder, official .pt or diffusers folder "
                   "(default: the official DiT-XL/2 for --image-size, downloaded once)")
    p.add_argument("--image-size", type=int, choices=(256, 512), default=None,
                   help="the official checkpoint to use without --ckpt: 256 (default) or 512")
    p.add_argument("--cfg-scale", type=float, default=cfg_scale, help=f"guidance scale (default {cfg_scale}; 1 = off)")
    p.add_argument("--cfg-channels", type=cfg_channels_arg, default="auto",
                   help="eps channels guided: an integer or 'all' (default: 3 for latent models as the official "
                   "release, all for pixel-space runs)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    p.add_argument("--steps", type=int, default=250, help="sampling steps (respaced from 1000; default 250)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0: deterministic)")
    p.add_argument("--vae", help=f"ema | mse | a diffusers VAE folder (default: a training run's own, else {vae})")
    p.set_defaults(default_vae=vae)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="compute dtype of the DiT")
    p.add_argument("--cache-dir", help="weights cache (default $DIT_JAX_CACHE or ~/.cache/dit_jax)")
    p.add_argument("--offline", action="store_true", default=None, help="never download; use the cache only")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def settings_from_args(args: argparse.Namespace, loaded: LoadedModel) -> SampleSettings:
    cfg_channels = args.cfg_channels
    if cfg_channels == "auto":
        cfg_channels = None if loaded.pixel_space else 3
    elif cfg_channels is not None and cfg_channels > loaded.model.out_channels:
        raise ValueError(f"--cfg-channels {cfg_channels}: this model has {loaded.model.out_channels} output "
                         f"channels (guide at most that many, or 'all')")
    return SampleSettings(num_steps=args.steps, cfg_scale=args.cfg_scale, cfg_channels=cfg_channels,
                          sampler=args.sampler, eta=args.eta, clip_denoised=loaded.clip_denoised)


# ----------------------------------------------------------------------------------------------------------
# Checks made before anything is loaded: a sampling run can take hours, so a bad flag or output path fails at once.
# ----------------------------------------------------------------------------------------------------------
def check_common_args(args: argparse.Namespace) -> None:
    """UsageError for values and combinations of add_common_args' flags that no model can sample with."""
    from dit_jax.diffusion import space_timesteps

    if args.steps < 1:
        raise UsageError(f"--steps {args.steps}: expected a positive number of sampling steps (default 250)")
    settings = SampleSettings(num_steps=args.steps, sampler=args.sampler)
    try:
        space_timesteps(1000, settings.respacing)  # the 1000-step process every DiT is trained with
    except ValueError as e:
        raise UsageError(f"--steps {args.steps} with --sampler {args.sampler}: {e}; choose another --steps") from e
    if not (math.isfinite(args.cfg_scale) and args.cfg_scale >= 0):
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
    if args.ckpt is not None and args.image_size is not None:
        raise UsageError("--image-size chooses the official checkpoint; with --ckpt the size comes from the "
                         "checkpoint: drop --image-size")
    if args.vae is not None:
        check_vae_arg(args.vae)
    if args.ckpt is not None:
        check_checkpoint_arg(args.ckpt, "--ckpt", folders=True)


def check_vae_arg(vae: str) -> None:
    """--vae: a registry name (ema, mse, ...) or an existing folder."""
    from dit_jax.weights.registry import UnknownWeightsError, resolve_name

    try:
        resolve_name(vae, "vae")
        return
    except UnknownWeightsError:
        pass
    check_input_folder(vae, "--vae", hint="give ema, mse or a diffusers VAE folder (with config.json)")


def check_checkpoint_arg(ckpt: str, flag: str, *, folders: bool) -> None:
    """ckpt must be something a loader reads: a training run, a checkpoint file (.pt/.pth/.bin/.ckpt or
    .safetensors) or, with folders (DiT: `dit-jax sample`, `sample-fid`), a converted or diffusers folder, or a
    registry name. Refused early with what it is and what is expected."""
    from dit_jax.convert.cli import CONFIG_FILE
    from dit_jax.convert.pt_reader import PT_SUFFIXES
    from dit_jax.train.export import checkpoint_dir, is_training_run
    from dit_jax.weights.registry import UnknownWeightsError, resolve_name

    suffixes = (*PT_SUFFIXES, ".safetensors")
    expected = (f"a training run, a `dit-jax convert` folder, a checkpoint file ({', '.join(suffixes)}) or a "
                "diffusers folder" if folders else
                f"a dit-jax training run or a checkpoint file ({', '.join(suffixes)})")
    if folders and not Path(ckpt).expanduser().exists():
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
    if folders and ((path / CONFIG_FILE).is_file() or (path / "config.json").is_file()
                    or (path / "transformer" / "config.json").is_file()):
        return
    if checkpoint_dir(path).name == "checkpoints":
        raise ValueError(f"{flag} {ckpt}: a training run without a complete checkpoint yet (the trainer saves one "
                         "every train.ckpt_every steps)")
    raise ValueError(f"{flag} {ckpt}: a folder that is not {expected}")


# ----------------------------------------------------------------------------------------------------------
# dit-jax sample
# ----------------------------------------------------------------------------------------------------------
def register(subparsers: Any, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, cfg_scale=4.0, vae="mse")
    p.add_argument("--labels", help="comma-separated class ids (default: the official sample.py's 8 classes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="sample.png", help="PNG grid to write (default sample.png)")
    p.add_argument("--nrow", type=int, default=4, help="images per grid row (default 4, as sample.py)")
    p.add_argument("--npz", help="also save the uint8 images and labels to this .npz")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    check_common_args(args)
    if args.nrow < 1:
        raise UsageError(f"--nrow {args.nrow}: expected a positive number of images per row")
    if args.labels is not None:
        label_list(args.labels)  # the form now; the range once the model is known
    check_output_file(args.out, "--out")
    if args.npz:
        check_output_file(args.npz, "--npz")
    loaded = load_model(args.ckpt, image_size=args.image_size or 256, dtype=args.dtype, cache_dir=args.cache_dir,
                        offline=args.offline, progress=args.progress)
    labels = parse_labels(args.labels, loaded.model.num_classes)
    settings = settings_from_args(args, loaded)
    mesh = data_mesh(jax.local_devices())
    decoder = load_decoder(loaded, vae_name(loaded, args.vae, args.default_vae), mesh, cache_dir=args.cache_dir,
                           offline=args.offline, progress=args.progress)
    sampler = Sampler.for_model(loaded.model, settings, mesh=mesh)
    print(f"sampling {len(labels)} images from {loaded.name} ({settings.sampler}, {settings.num_steps} steps, "
          f"cfg {settings.cfg_scale}) on {mesh.size} {jax.local_devices()[0].platform} device(s)", flush=True)
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


if __name__ == "__main__":  # pragma: no cover
    from dit_jax.cli import main

    sys.exit(main(["sample", *sys.argv[1:]]))

