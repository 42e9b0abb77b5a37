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
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dit_jax.images import make_grid, save_png, to_uint8
from dit_jax.models import DDT, DiT
from dit_jax.models.vae import SD_VAE_SCALE, AutoencoderKL
from dit_jax.sample import OFFICIAL_LABELS, Sampler, SampleSettings, data_mesh, example_keys, pad_to_multiple

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
VAE_DOWNSAMPLE = 8


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
    """--vae if given, else the training run's VAE, else the command's default ("none" in pixel space)."""
    if loaded.pixel_space:
        return "none"
    return requested or loaded.vae or default


def load_decoder(loaded: LoadedModel, vae: str, mesh: jax.sharding.Mesh, **kw: Any) -> Decoder:
    if loaded.pixel_space:
        return Decoder(None, mesh)
    from dit_jax import weights

    return Decoder(weights.pretrained_vae(vae, **kw), mesh)


def parse_labels(text: str | None, num_classes: int) -> np.ndarray:
    """"207,360" -> array; None -> the official sample.py's classes (or 0..min(8, classes)-1 for small models)."""
    if text is None:
        labels = list(OFFICIAL_LABELS) if num_classes == 1000 else list(range(min(8, num_classes)))
    else:
        try:
            labels = [int(v) for v in text.replace(" ", "").split(",") if v]
        except ValueError:
            raise ValueError(f"--labels must be comma-separated integers, got {text!r}") from None
        if not labels:
            raise ValueError("--labels is empty")
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"labels {bad} are outside [0, {num_classes}) for this model")
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
    p.add_argument("--image-size", type=int, choices=(256, 512), default=256, help="official checkpoint to use")
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
    return SampleSettings(num_steps=args.steps, cfg_scale=args.cfg_scale, cfg_channels=cfg_channels,
                          sampler=args.sampler, eta=args.eta, clip_denoised=loaded.clip_denoised)


def error(command: str, e: BaseException) -> int:
    print(f"dit-jax {command}: error: {e}", file=sys.stderr)
    return 1


# ----------------------------------------------------------------------------------------------------------
# dit-jax sample
# ----------------------------------------------------------------------------------------------------------
def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sample", help="sample a class-conditional PNG grid", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, cfg_scale=4.0, vae="mse")
    p.add_argument("--labels", help="comma-separated class ids (default: the official sample.py's 8 classes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="sample.png", help="PNG grid to write (default sample.png)")
    p.add_argument("--nrow", type=int, default=4, help="images per grid row (default 4, as sample.py)")
    p.add_argument("--npz", help="also save the uint8 images and labels to this .npz")
    p.set_defaults(func=run)
    from dit_jax.sample_fid import register as register_fid

    register_fid(subparsers)
    return p


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        loaded = load_model(args.ckpt, image_size=args.image_size, dtype=args.dtype, cache_dir=args.cache_dir,
                            offline=args.offline, progress=args.progress)
        labels = parse_labels(args.labels, loaded.model.num_classes)
        settings = settings_from_args(args, loaded)
        mesh = data_mesh(jax.local_devices())
        decoder = load_decoder(loaded, vae_name(loaded, args.vae, args.default_vae), mesh, cache_dir=args.cache_dir,
                               offline=args.offline, progress=args.progress)
        sampler = Sampler.for_model(loaded.model, settings, mesh=mesh)
    except (ValueError, OSError, ImportError) as e:
        return error("sample", e)
    print(f"sampling {len(labels)} images from {loaded.name} ({settings.sampler}, {settings.num_steps} steps, "
          f"cfg {settings.cfg_scale}) on {mesh.size} {jax.local_devices()[0].platform} device(s)", flush=True)
    t1 = time.perf_counter()
    latents = sampler(labels, example_keys(args.seed, np.arange(len(labels))), progress=args.progress)
    images = decoder(latents)
    t2 = time.perf_counter()
    upscale = max(1, 64 // images.shape[1])  # tiny pixel-space samples are enlarged to be visible
    out = save_png(make_grid(images, nrow=args.nrow), args.out, upscale=upscale)
    if args.npz:
        Path(args.npz).parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.npz, images=images, labels=labels)
    print(f"wrote {out.resolve()} ({len(labels)} images, labels {labels.tolist()}); "
          f"sampling {t2 - t1:.1f}s, total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from dit_jax.cli import main

    sys.exit(main(["sample", *sys.argv[1:]]))

