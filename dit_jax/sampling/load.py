"""What `dit-jax sample`, `sample-fid` and `ddt-schedule` sample: one loader for every kind of checkpoint, returning
the model with what sampling needs to know about it (its objective, its space, its time scale).

    loaded = load_model("runs/my_run")                 # a training run: the EMA weights and the run's config
    loaded = load_model(None, image_size=512)          # the official DiT-XL/2 (downloaded and converted once)
    loaded = load_model("DiT-XL-2-256x256.pt")         # an official .pt, a `dit-jax convert` folder, diffusers
    loaded = load_model("DDT-XL-22en6de-R256.ckpt")    # a released DDT (MCG-NJU/DDT's Lightning layout)
    loaded = load_model(None, variant="DDT-S/2", random_init=True)   # an untrained model (smoke runs)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from flax import nnx

from dit_jax.constants import VAE_DOWNSAMPLE
from dit_jax.errors import CheckpointMismatchError
from dit_jax.models.families import DTYPES, FAMILIES, Family, family_of

OFFICIAL_SIZES = (256, 512)  # the official DiT-XL/2 checkpoints (facebookresearch/DiT download.py)
DEFAULT_DDT = "DDT-XL/2"  # the released checkpoint's (MCG-NJU/DDT: DDT-XL-22en6de-R256)
DDT_KEYS = ("ema_denoiser.", "denoiser.", "s_embedder.")  # a DDT state dict (Lightning-wrapped, or the denoiser's)


@dataclasses.dataclass
class LoadedModel:
    """A model ready to sample, and how to turn its samples into pixels."""

    model: nnx.Module  # a DiT or a DDT
    name: str  # for folder names and logs, e.g. "DiT-XL-2-256x256" or "my_run-step0020000"
    objective: str  # what it was trained with (dit_jax.diffusion.objectives): "diffusion" or "flow"
    pixel_space: bool  # True: samples are images in [-1, 1]; False: SD latents (decode with the VAE)
    image_size: int
    vae: str | None = None  # the VAE a training run's latents came from (its config.data.vae)
    time_scale: float = 1.0  # a flow model reads t * time_scale (a run's config.flow.time_scale)

    @property
    def clip_denoised(self) -> bool:
        """Pixel-space runs clip x_0 to [-1, 1] as the trainer's grids do; latents never (the official sample.py)."""
        return self.pixel_space


def variant_family(variant: str) -> Family:
    """The family whose released sizes include `variant` ("DiT-XL/2", "DDT-S/2", ...)."""
    for fam in FAMILIES.values():
        if variant in fam.variants:
            return fam
    known = [v for fam in FAMILIES.values() for v in fam.variants]
    raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(known)}")


def _random(variant: str, image_size: int, seed: int, dtype: Any) -> LoadedModel:
    fam = variant_family(variant)
    model = fam.variants[variant](input_size=image_size // VAE_DOWNSAMPLE, dtype=dtype, rngs=nnx.Rngs(seed))
    return LoadedModel(model, f"{variant.replace('/', '-')}-random", fam.objectives[0], False, image_size)


def _holds_ddt(path: Path, variant: str | None) -> bool:
    """Whether a checkpoint file is a DDT's, told without reading its tensors: a DDT --variant, a Lightning .ckpt
    (the released DDT files), or a .safetensors whose header names DDT keys. Anything else is read as a DiT (the
    official .pt release, a converted or diffusers folder), so a DiT file is read once."""
    if not path.is_file():
        return False
    if variant is not None:
        return variant_family(variant).name == "ddt"
    if path.suffix == ".ckpt":
        return True
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="np") as f:
                return any(k.startswith(DDT_KEYS) for k in f.keys())
        except Exception:  # noqa: BLE001 - unreadable: the DiT reader reports what is wrong with it
            return False
    return False


def _ddt_file(path: Path, variant: str | None, image_size: int, which: str, dtype: Any) -> LoadedModel:
    from dit_jax.convert.ddt import load_official_ddt
    from dit_jax.convert.pt_reader import read_state_dict

    variant = variant or DEFAULT_DDT
    make = FAMILIES["ddt"].variants[variant]
    abstract = nnx.eval_shape(lambda: make(input_size=image_size // VAE_DOWNSAMPLE, dtype=dtype, rngs=nnx.Rngs(0)))
    try:
        model = load_official_ddt(abstract, read_state_dict(path), which=which)
    except CheckpointMismatchError as e:  # hundreds of keys: the summary, in one line
        raise ValueError(f"{path} does not fit {variant} (is it a {variant} checkpoint? give --variant): "
                         f"{e.summary()}") from e
    name = path.name.removesuffix(path.suffix) or "ckpt"
    return LoadedModel(model, name, "flow", False, image_size)


def load_model(
    ckpt: str | None,
    *,
    image_size: int | None = None,
    variant: str | None = None,
    which: str = "ema",
    random_init: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    cache_dir: str | None = None,
    offline: bool | None = None,
    progress: bool = True,
) -> LoadedModel:
    """The model to sample (see the module docstring). which: "ema" (default) or "model" (the trained weights) of
    a training run or a DDT checkpoint. image_size: the official checkpoint's (256 or 512) without ckpt, a DDT
    file's (default 256); a training run's and a DiT file's come from the checkpoint. variant: the size of a
    random model or of a DDT file (default DDT-XL/2)."""
    from dit_jax.train.export import is_training_run, load_ema_model
    from dit_jax.train.config_schema import data_space

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {tuple(DTYPES)}")
    if which not in ("ema", "model"):
        raise ValueError(f"which must be ema or model, got {which!r}")
    if random_init:
        return _random(variant or DEFAULT_DDT, image_size or 256, seed, DTYPES[dtype])
    if ckpt is not None and is_training_run(ckpt):
        model, config, step = load_ema_model(ckpt, use_ema=which == "ema", dtype=DTYPES[dtype])
        pixel = data_space(config) == "pixel"
        size = config.data.image_size if pixel else model.input_size * VAE_DOWNSAMPLE
        if image_size is not None and image_size != size:
            raise ValueError(f"{ckpt} was trained for {size} px images, not {image_size}: drop the image size option")
        vae = None if pixel else str(config.data.vae).removeprefix("stabilityai/")
        return LoadedModel(model, f"{Path(ckpt).resolve().name}-step{step:07d}", str(config.objective), pixel, size,
                           vae=vae, time_scale=float(config.flow.time_scale))
    if ckpt is not None and _holds_ddt(Path(ckpt).expanduser(), variant):
        return _ddt_file(Path(ckpt).expanduser(), variant, image_size or 256, which, DTYPES[dtype])
    if ckpt is None:
        size = image_size or 256
        if size not in OFFICIAL_SIZES:
            raise ValueError(f"the official DiT-XL/2 checkpoints are 256 or 512 px, not {size}")
        ckpt = name = f"DiT-XL-2-{size}x{size}"
    else:
        name = Path(ckpt).name.removesuffix(".pt").removesuffix(".safetensors") or "ckpt"
    from dit_jax import weights

    model = weights.pretrained_dit(ckpt, cache_dir=cache_dir, offline=offline, progress=progress, dtype=DTYPES[dtype])
    size = model.input_size * VAE_DOWNSAMPLE
    if image_size is not None and image_size != size:
        raise ValueError(f"{ckpt} is a {size} px model, not {image_size}: drop the image size option")
    return LoadedModel(model, name, family_of(model).objectives[0], False, size)

