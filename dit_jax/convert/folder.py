"""The converted-folder format: what `dit-jax convert` writes and the loaders read back.

    convert(input, output_dir, ...)     an official .pt / .safetensors or a diffusers folder -> a converted folder
    read_converted_config(folder)       its dit_config.json (checked: format and version)
    load_converted(folder, **overrides) the DiT it holds

A converted folder holds `state/` (STATE_DIR: Orbax StandardCheckpointer of nnx.state(model)) and
`dit_config.json` (CONFIG_FILE: the DiT constructor arguments (ARCH_KEYS), variant, source and sha256 of the
input; FORMAT, FORMAT_VERSION). It is written to a temporary sibling folder and renamed at the end, so an
interrupted conversion leaves nothing half-written. The command (`dit-jax convert`) is dit_jax/convert/cli.py;
the weights cache (dit_jax/weights/pretrained.py) converts into its cache with `convert` and reads with
`read_converted_config` / `load_converted`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from dit_jax.convert.common import (
    VAE_DOWNSAMPLE,
    Arch,
    CheckpointReadError,
    assign,
    heads_for_width,
    model_to_numpy,
    variant_name,
)
from dit_jax.convert.diffusers_dit import (
    dit_kwargs_from_diffusers_config,
    load_diffusers_dit,
    read_diffusers_folder,
)
from dit_jax.convert.official_dit import infer_official_arch, load_official_dit
from dit_jax.convert.pt_reader import PT_SUFFIXES, read_pt, read_state_dict
from dit_jax.models.dit import DiT, decode_variant
from dit_jax.paths import check_input_exists, check_input_file, check_input_folder, check_output_folder, sha256_file

# the keys of a DDT checkpoint (MCG-NJU Lightning file, or its denoiser alone): not a DiT's
DDT_KEY_PREFIXES = ("ema_denoiser.", "denoiser.", "s_embedder.")
CONFIG_FILE = "dit_config.json"
STATE_DIR = "state"
FORMAT = "dit-jax/converted-dit"
FORMAT_VERSION = 1
# DiT constructor arguments stored in dit_config.json["model"].
ARCH_KEYS = (
    "input_size",
    "patch_size",
    "in_channels",
    "hidden_size",
    "depth",
    "num_heads",
    "mlp_ratio",
    "class_dropout_prob",
    "num_classes",
    "learn_sigma",
    "scan_blocks",
    "timestep_freq_shift",
)


class ConvertError(ValueError):
    """A conversion request that cannot be carried out (with the reason). option: the `dit-jax convert` option
    that would settle it (--variant, --num-heads, ...), which the message asks for; a caller that converts without
    the user's options (dit_jax.weights, for `dit-jax sample --ckpt FILE`) says what to do instead."""

    def __init__(self, reason: str, option: str | None = None):
        self.reason = reason
        self.option = option
        super().__init__(f"{reason}: pass {option}" if option else reason)


# ----------------------------------------------------------------------------------------------------------
# Source detection and model description.
# ----------------------------------------------------------------------------------------------------------
def detect_source(path: Path) -> str:
    """'official' (a .pt/.pth/.bin/.ckpt or .safetensors file) or 'diffusers' (a model folder with config.json)."""
    check_input_exists(path, error=ConvertError)
    if path.is_dir():
        if (path / "config.json").is_file() or (path / "transformer" / "config.json").is_file():
            return "diffusers"
        raise ConvertError(
            f"{path}: a folder without config.json (nor transformer/config.json), so not a diffusers model folder; "
            f"pass a diffusers DiT folder, or an official checkpoint file ({', '.join(PT_SUFFIXES)}, .safetensors)"
        )
    if path.suffix in PT_SUFFIXES:
        return "official"
    if path.suffix == ".safetensors":
        return "official"  # a diffusers file alone lacks num_heads and sample_size: pass its folder instead
    raise ConvertError(
        f"{path}: not a checkpoint this command reads (suffix {path.suffix or 'none'!r}; expected one of "
        f"{', '.join(PT_SUFFIXES)}, .safetensors, or a diffusers model folder); if it is one",
        option="--source official|diffusers",
    )


def check_options(
    image_size: int | None = None,
    num_heads: int | None = None,
    embedder_atol: float = 0.0,
    timestep_freq_shift: float = 0.0,
) -> None:
    """ConvertError for an option value no conversion can use (before anything is read)."""
    if image_size is not None and (image_size <= 0 or image_size % VAE_DOWNSAMPLE):
        raise ConvertError(f"--image-size {image_size}: expected a positive multiple of {VAE_DOWNSAMPLE} (e.g. 256)")
    if num_heads is not None and num_heads < 1:
        raise ConvertError(f"--num-heads {num_heads}: expected a positive number of attention heads")
    if not (math.isfinite(embedder_atol) and embedder_atol >= 0):
        raise ConvertError(f"--embedder-atol {embedder_atol}: expected a tolerance >= 0")
    if not math.isfinite(timestep_freq_shift):
        raise ConvertError(f"--timestep-freq-shift {timestep_freq_shift}: expected a finite number (0 or 1)")


def check_output(out: Path, overwrite: bool) -> None:
    """Before any work: `out` must not exist (or, with overwrite, be an earlier conversion or an empty folder),
    and the folder that holds it must be creatable and writable (it is written beside it, then renamed)."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ConvertError(f"{out} exists; pass --overwrite to replace it, or choose another OUTPUT_DIR")
        if not out.is_dir():
            raise ConvertError(
                f"{out} is a file, not a converted folder; --overwrite only replaces the output of an earlier "
                "`dit-jax convert`: move the file or choose another OUTPUT_DIR"
            )
        if not ((out / CONFIG_FILE).exists() or (out / STATE_DIR).exists() or not any(out.iterdir())):
            raise ConvertError(
                f"{out} is a folder that holds no converted checkpoint ({CONFIG_FILE} / {STATE_DIR}/); --overwrite "
                "only replaces the output of an earlier `dit-jax convert`, so nothing else is deleted: choose "
                "another OUTPUT_DIR"
            )
    check_output_folder(out, "OUTPUT_DIR", renamed=True)


def _variant_kwargs(variant: str) -> dict[str, int]:
    try:
        return decode_variant(variant)
    except ValueError as e:
        raise ConvertError(str(e)) from e


def _official_kwargs(args: argparse.Namespace, sd: dict[str, np.ndarray], train_args: Any) -> tuple[dict, str]:
    """DiT kwargs for an official-layout state_dict, from --variant/--image-size, train.py's args, and shapes."""
    arch: Arch = infer_official_arch(sd)
    variant = args.variant or getattr(train_args, "model", None)
    image_size = args.image_size or getattr(train_args, "image_size", None)
    how = "--variant" if args.variant else ("train.py args" if variant else "shapes")
    if variant:
        kw = dict(_variant_kwargs(variant))
        seen = {"depth": arch.depth, "hidden_size": arch.hidden_size, "patch_size": arch.patch_size}
        diff = {k: (kw[k], v) for k, v in seen.items() if v is not None and v != kw[k]}
        if diff:
            raise ConvertError(
                f"{variant} does not match the checkpoint ({arch.describe()}; looks like "
                f"{arch.variant or 'a custom DiT'}): " + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items())
            )
    else:
        if None in (arch.depth, arch.hidden_size, arch.patch_size):
            raise ConvertError("cannot infer the architecture from the checkpoint's shapes", option="--variant")
        kw = dict(depth=arch.depth, hidden_size=arch.hidden_size, patch_size=arch.patch_size)
        heads = args.num_heads or heads_for_width(arch.hidden_size)
        if heads is None:
            raise ConvertError(
                f"width {arch.hidden_size} is none of the paper's (384, 768, 1024, 1152) and the head count is not "
                "visible in the weights", option="--num-heads"
            )
        kw["num_heads"] = heads
    if args.num_heads:
        kw["num_heads"] = args.num_heads
    if image_size:
        if image_size % VAE_DOWNSAMPLE:
            raise ConvertError(f"--image-size {image_size} is not a multiple of {VAE_DOWNSAMPLE}")
        kw["input_size"] = image_size // VAE_DOWNSAMPLE
        if arch.input_size is not None and arch.input_size != kw["input_size"]:
            raise ConvertError(
                f"--image-size {image_size} means {kw['input_size']}x{kw['input_size']} latents, but the checkpoint's "
                f"pos_embed is for {arch.input_size}x{arch.input_size} ({arch.input_size * VAE_DOWNSAMPLE} px)"
            )
    elif arch.input_size is not None:
        kw["input_size"] = arch.input_size
    else:
        raise ConvertError("the checkpoint has no pos_embed to tell the resolution from", option="--image-size")
    if arch.in_channels is not None:
        kw["in_channels"] = arch.in_channels
    if arch.num_classes is not None:
        kw["num_classes"] = arch.num_classes
    if arch.learn_sigma is not None:
        kw["learn_sigma"] = arch.learn_sigma
    return kw, how


def _diffusers_kwargs(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    try:
        kw = dit_kwargs_from_diffusers_config(config)
    except ValueError as e:
        raise ConvertError(str(e)) from e
    if args.variant:
        want = _variant_kwargs(args.variant)
        diff = {k: (v, kw[k]) for k, v in want.items() if kw[k] != v}
        if diff:
            raise ConvertError(
                f"--variant {args.variant} does not match config.json: "
                + ", ".join(f"{k} {a} vs {b} in config" for k, (a, b) in diff.items())
            )
    if args.image_size and args.image_size != kw["input_size"] * VAE_DOWNSAMPLE:
        raise ConvertError(
            f"--image-size {args.image_size} does not match config.json sample_size {kw['input_size']} "
            f"({kw['input_size'] * VAE_DOWNSAMPLE} px)"
        )
    return kw


def _named_variant(kw: dict[str, Any]) -> str | None:
    return variant_name(kw.get("depth"), kw.get("hidden_size"), kw.get("patch_size"))


# ----------------------------------------------------------------------------------------------------------
# Convert.
# ----------------------------------------------------------------------------------------------------------
def convert(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    source: str | None = None,
    variant: str | None = None,
    image_size: int | None = None,
    num_heads: int | None = None,
    weights: str = "ema",
    scan_blocks: bool = False,
    timestep_freq_shift: float = 0.0,
    embedder_atol: float = 0.0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert a checkpoint and write it to output_dir; returns the dit_config.json content."""
    args = argparse.Namespace(variant=variant, image_size=image_size, num_heads=num_heads)
    src = Path(input_path)
    out = Path(output_dir)
    check_options(image_size, num_heads, embedder_atol, timestep_freq_shift)
    if weights not in ("ema", "model"):
        raise ConvertError(f"weights {weights!r}: expected 'ema' or 'model'")
    source = source or detect_source(src)
    if source not in ("official", "diffusers"):
        raise ConvertError(f"unknown source {source!r}; expected 'official' or 'diffusers'")
    check_input_exists(src, error=ConvertError)
    check_output(out, overwrite)  # before reading: a checkpoint can take minutes to read and convert

    hashed: dict[str, str] = {}
    if source == "diffusers":
        check_input_folder(src, what="a diffusers source (a model folder with config.json)", error=ConvertError,
                           hint="for an official checkpoint file, pass --source official or leave --source out")
        config, sd, files = read_diffusers_folder(src)
        kw = _diffusers_kwargs(args, config)
        folder = files[0].parent
        for f in [folder / "config.json", *files]:
            hashed[f.name] = sha256_file(f)
        how = "config.json"
        train_args = None
    else:
        check_input_file(src, what=f"an official source (a checkpoint file: {', '.join(PT_SUFFIXES)} or .safetensors)",
                         error=ConvertError,
                         hint="for a diffusers model folder, pass --source diffusers or leave --source out")
        sd = read_state_dict(src, which=weights)
        if any(k.startswith(DDT_KEY_PREFIXES) for k in sd):
            raise ConvertError(f"{src}: the keys look like a DDT checkpoint (ema_denoiser.*, s_embedder.*), not a DiT "
                               f"one: sample it with `dit-jax sample --ckpt {src} --variant DDT-XL/2` (its size)")
        train_args = None
        if src.suffix in PT_SUFFIXES:
            obj = read_pt(src)  # memory-mapped: cheap to read twice
            if isinstance(obj, dict) and isinstance(obj.get("args"), argparse.Namespace):
                train_args = obj["args"]
            del obj
        kw, how = _official_kwargs(args, sd, train_args)
        hashed[src.name] = sha256_file(src)
    kw.update(scan_blocks=scan_blocks, timestep_freq_shift=float(timestep_freq_shift))

    model = nnx.eval_shape(lambda: DiT(**kw, rngs=nnx.Rngs(0)))  # abstract: the loader makes it concrete
    if source == "diffusers":
        load_diffusers_dit(model, sd, embedder_atol=embedder_atol)
    else:
        load_official_dit(model, sd)  # already unwrapped with `weights`
    n_params = sum(int(np.prod(v.shape)) for v in _leaves(nnx.state(model, nnx.Param)))

    full: dict[str, Any] = {k: getattr(model, k) for k in ARCH_KEYS if k != "timestep_freq_shift"}
    full["timestep_freq_shift"] = float(model.t_embedder.downscale_freq_shift)
    full["mlp_ratio"] = float(full["mlp_ratio"])
    full["class_dropout_prob"] = float(full["class_dropout_prob"])
    combined = sha256_text("\n".join(f"{k} {v}" for k, v in sorted(hashed.items())))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": full,
        "variant": _named_variant(full),
        "image_size": full["input_size"] * VAE_DOWNSAMPLE,
        "num_params": n_params,
        "source": source,
        "architecture_from": how,
        "weights": weights if source == "official" else None,
        "input": str(src.resolve()),
        "input_sha256": hashed[src.name] if len(hashed) == 1 else combined,
        "input_files_sha256": hashed,
        "created_unix": int(time.time()),
    }
    if train_args is not None:
        meta["train_args"] = {k: v for k, v in vars(train_args).items() if isinstance(v, (str, int, float, bool))}
    _write_atomically(out, model, meta, overwrite)
    return meta


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _leaves(state: Any) -> list[Any]:
    return jax.tree.leaves(state)


def _save_state(path: Path, model: DiT) -> None:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, nnx.state(model))
        ckpt.wait_until_finished()


def _write_atomically(out: Path, model: DiT, meta: dict[str, Any], overwrite: bool) -> None:
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir (unlike tempfile.mkdtemp's 0700) gives the folder the user's usual permissions after the rename
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(tmp)
    try:
        _save_state(tmp / STATE_DIR, model)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
        if out.exists():
            if not overwrite:
                raise ConvertError(f"{out} appeared while converting; not replacing it")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------------------
# Load back.
# ----------------------------------------------------------------------------------------------------------
def read_converted_config(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / CONFIG_FILE
    try:
        meta = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointReadError(f"{file}: not a converted dit-jax checkpoint ({e})") from e
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointReadError(f"{file}: unknown format {meta.get('format')!r} v{meta.get('format_version')}")
    return meta


def load_converted(path: str | os.PathLike, **overrides: Any) -> DiT:
    """Rebuild the DiT written by `dit-jax convert` (abstract model via nnx.eval_shape, then Orbax restore).

    overrides go to the DiT constructor for options that do not change the weights (dtype, attn_impl,
    remat_policy, scan_blocks: a different block layout than the saved one is restacked).
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    meta = read_converted_config(path)
    kw = dict(meta["model"])
    fixed = sorted(set(overrides) & (set(kw) - {"scan_blocks"}))
    if fixed:
        raise ValueError(f"{fixed} are fixed by the converted weights ({path / CONFIG_FILE}); they cannot be overridden")
    saved_scan = bool(kw.get("scan_blocks", False))
    want_scan = bool(overrides.pop("scan_blocks", saved_scan))
    abstract = nnx.eval_shape(lambda: DiT(**kw, **overrides, rngs=nnx.Rngs(0)))
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's copy, whatever wrote the folder
    spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=here), nnx.state(abstract))
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(path / STATE_DIR, spec)
    nnx.update(abstract, restored)
    if want_scan == saved_scan:
        return abstract
    kw["scan_blocks"] = want_scan
    target = nnx.eval_shape(lambda: DiT(**kw, **overrides, rngs=nnx.Rngs(0)))
    assign(target, model_to_numpy(abstract))
    return target
