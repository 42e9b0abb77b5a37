"""Registry names -> files in the cache -> models: `download`, `converted_dit`, `pretrained_dit`, `pretrained_vae`.

jax, flax and the converters are imported only when a model is built, so listing and downloading stay light.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dit_jax.paths import sha256_file
from dit_jax.weights import registry, transfer
from dit_jax.weights.transfer import WeightsError, file_lock, lock_path, offline_error, read_record
from dit_jax.weights.registry import REGISTRY, UnknownWeightsError, is_offline, resolve_name

if TYPE_CHECKING:
    from dit_jax.models.dit import DiT
    from dit_jax.models.vae import AutoencoderKL

log = logging.getLogger("dit_jax.weights")


# ----------------------------------------------------------------------------------------------------------
# Download.
# ----------------------------------------------------------------------------------------------------------
def download(
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Fetch a registry entry into the cache (or check the cached copy) and return its path.

    name: "DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt" (-> the .pt file), "sd-vae-ft-ema", "sd-vae-ft-mse"
    (-> the folder with config.json and the safetensors), or an alias ("DiT-XL/2-256", "ema", ...).
    offline: never touch the network (None: $DIT_JAX_OFFLINE / $HF_HUB_OFFLINE); a missing file is an
    OfflineError naming where it must go and its URL. force: fetch again even when cached.
    """
    key = resolve_name(name)
    entry = REGISTRY[key]
    folder = entry.folder(registry.cache_dir(cache_dir))
    off = is_offline(offline)
    if off and force:
        raise WeightsError(f"cannot re-download {key!r} (force) in offline mode")
    if off:
        missing = [(folder / f.filename, f.resolved_url()) for f in entry.files if not (folder / f.filename).exists()]
        if missing:
            raise offline_error(missing, repr(key))
    for f in entry.files:
        transfer.fetch(
            f.resolved_url(),
            folder / f.filename,
            size=f.size,
            sha256=f.sha256,
            etag_is_sha256=f.etag_is_sha256,
            offline=off,
            force=force,
            progress=progress,
            fix=f"dit-jax download --force {key}",
        )
    if entry.kind == "dit" and len(entry.files) == 1:
        return folder / entry.files[0].filename
    return folder


# ----------------------------------------------------------------------------------------------------------
# DiT: convert once into the cache, then load from Orbax.
# ----------------------------------------------------------------------------------------------------------
def _source_digest(path: Path) -> str:
    """sha256 of a checkpoint file, or of a diffusers folder's files (name + digest of each, sorted)."""
    if path.is_file():
        return sha256_file(path)
    folder = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    lines = "".join(f"{p.name} {sha256_file(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _slug(path: Path) -> str:
    stem = path.name.removesuffix(path.suffix) if path.is_file() else path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem) or "checkpoint"


def _converted_ok(folder: Path, input_sha256: str | None) -> bool:
    """Whether `folder` holds a readable conversion (of the file with `input_sha256`, when given).
    Says why on stderr (via logging) when a folder exists but is unusable."""
    from dit_jax.convert.folder import STATE_DIR, read_converted_config
    from dit_jax.convert.common import CheckpointReadError

    if not folder.exists():
        return False
    try:
        meta = read_converted_config(folder)
    except CheckpointReadError as e:
        log.warning("the converted cache %s is damaged (%s); converting again", folder, e)
        return False
    state = folder / STATE_DIR
    if not state.is_dir() or not any(state.iterdir()):
        log.warning("the converted cache %s is damaged (no %s/); converting again", folder, STATE_DIR)
        return False
    if input_sha256 and meta.get("input_sha256") != input_sha256:
        log.warning(
            "%s was converted from another file (sha256 %s, now %s); converting again",
            folder,
            meta.get("input_sha256"),
            input_sha256,
        )
        return False
    return True


def converted_dit(
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
    progress: bool = True,
    reconvert: bool = False,
    convert_options: Mapping[str, Any] | None = None,
) -> Path:
    """The folder of a converted DiT (state/ + dit_config.json), converting into the cache when needed.

    name: a registry DiT (downloaded first when not cached) -> <cache>/converted/<name>; a converted folder ->
    itself; a .pt/.safetensors file or diffusers folder -> <cache>/converted/<stem>-<sha256[:16]> (keyed by
    the input's sha256, so a changed file is converted again). convert_options go to
    dit_jax.convert.folder.convert (variant, image_size, num_heads, ...). reconvert: convert even when cached.
    """
    root = registry.cache_dir(cache_dir)
    options = dict(convert_options or {})
    try:
        key = resolve_name(name, "dit", paths=True)
    except UnknownWeightsError:
        if not Path(name).expanduser().exists():
            raise
        return _converted_local(Path(name).expanduser(), root, options, progress, reconvert)
    entry = REGISTRY[key]
    out = entry.converted_folder(root)
    input_sha = read_record(entry.folder(root) / entry.files[0].filename)  # None when the .pt is not cached
    with file_lock(lock_path(out)):
        if not reconvert and _converted_ok(out, input_sha):
            return out
        source = download(key, cache_dir=root, offline=offline, progress=progress)
        _convert(source, out, {**entry.convert_options, **options}, progress)
    return out


def _converted_local(source: Path, root: Path, options: Mapping[str, Any], progress: bool, reconvert: bool) -> Path:
    """converted_dit for a path: a converted folder as it is, else a conversion keyed by the input's sha256."""
    from dit_jax.convert.folder import CONFIG_FILE

    if (source / CONFIG_FILE).is_file():
        return source.absolute()
    out = root / "converted" / f"{_slug(source)}-{_source_digest(source)[:16]}"
    with file_lock(lock_path(out)):
        if not reconvert and _converted_ok(out, None):  # the folder name carries the sha256
            return out
        _convert(source, out, options, progress)
    return out


def _convert(source: Path, out: Path, options: Mapping[str, Any], progress: bool) -> None:
    import jax

    from dit_jax.convert.folder import ConvertError

    if progress:
        print(f"dit-jax: converting {source}\n      -> {out}", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    if jax.process_count() == 1:
        _convert_for_loading(source, out, options)
        return
    # In a multi-process job each host converts for its own cache (under the cache's lock), but Orbax's saves are
    # job-wide (barriers, process 0 writes): convert in a one-process child on the CPU instead.
    import json
    import subprocess

    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
    env["JAX_PLATFORMS"] = "cpu"  # the accelerator belongs to the parent
    code = ("import json, sys; from pathlib import Path; from dit_jax.weights.pretrained import _convert_for_loading; "
            "_convert_for_loading(Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]))")
    proc = subprocess.run([sys.executable, "-c", code, str(source), str(out), json.dumps(dict(options))], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise ConvertError(f"converting {source} failed:\n{proc.stderr.strip()[-3000:]}")


def _convert_for_loading(source: Path, out: Path, options: Mapping[str, Any]) -> None:
    """dit_jax.convert.folder.convert, for a loader (`dit-jax sample --ckpt FILE`, pretrained_dit): a file that
    `dit-jax convert` could read only with an option (--variant, --num-heads, ...) is not one this loader can read
    as it is, and the error says so, and what to do, instead of asking for an option the caller does not have."""
    from dit_jax.convert.folder import ConvertError, convert

    try:
        convert(source, out, overwrite=True, **options)
    except ConvertError as e:
        if e.option is None:
            raise
        raise ConvertError(
            f"{source} is not a DiT checkpoint that can be read as it is ({e.reason}). A DDT checkpoint? sample it "
            f"with `dit-jax sample --ckpt {source} --variant DDT-XL/2` (its size). A DiT: convert it with "
            f"`dit-jax convert` (which takes {e.option}), then pass the converted folder"
        ) from e


def _check_overrides(folder: Path, overrides: Mapping[str, Any]) -> None:
    """Raise the user's errors (a weight-fixed or unknown option, a bad value) before any loading, so that a
    loading failure afterwards can only mean a damaged folder."""
    from flax import nnx

    from dit_jax.convert.folder import read_converted_config
    from dit_jax.models.dit import DiT

    kw = dict(read_converted_config(folder)["model"])
    fixed = sorted(set(overrides) & (set(kw) - {"scan_blocks"}))
    if fixed:
        raise ValueError(f"{fixed} are fixed by the converted weights ({folder}); they cannot be overridden")
    kw.update(overrides)
    nnx.eval_shape(lambda: DiT(**kw, rngs=nnx.Rngs(0)))  # abstract: TypeError / ValueError for bad options


def pretrained_dit(
    name: str = "DiT-XL-2-256x256",
    *,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
    progress: bool = True,
    convert_options: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> "DiT":
    """A pretrained DiT: downloaded, converted once into the cache (Orbax), and loaded from there.

    name: "DiT-XL-2-256x256" / "DiT-XL-2-512x512" (with or without ".pt"; aliases "DiT-XL/2-256",
    "DiT-XL/2-512"), a converted folder, a .pt/.safetensors file or a diffusers folder (see converted_dit).
    overrides: options that do not change the weights (dtype, attn_impl, remat_policy, scan_blocks).
    A damaged converted folder in the cache is reported and converted again.
    """
    from dit_jax.convert.folder import load_converted

    folder = converted_dit(
        name, cache_dir=cache_dir, offline=offline, progress=progress, convert_options=convert_options
    )
    _check_overrides(folder, overrides)
    try:
        return load_converted(folder, **overrides)
    except Exception as e:  # noqa: BLE001 - options were checked above: any failure here is the folder's
        if not folder.is_relative_to(registry.cache_dir(cache_dir)):
            raise
        log.warning("the converted cache %s is damaged (%s: %s); converting again", folder, type(e).__name__, e)
    folder = converted_dit(
        name, cache_dir=cache_dir, offline=offline, progress=progress, convert_options=convert_options, reconvert=True
    )
    return load_converted(folder, **overrides)


# ----------------------------------------------------------------------------------------------------------
# VAE.
# ----------------------------------------------------------------------------------------------------------
def pretrained_vae(
    name: str = "ema",
    *,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
    progress: bool = True,
    dtype: Any = None,
) -> "AutoencoderKL":
    """The SD VAE the official sample.py uses: "ema" / "mse" (or "sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse"),
    downloaded into <cache>/vae/<name>/ when needed; or a local diffusers VAE folder. dtype: compute dtype."""
    from dit_jax.convert.diffusers_vae import load_diffusers_vae_folder

    try:
        key = resolve_name(name, "vae", paths=True)
    except UnknownWeightsError:
        if not Path(name).expanduser().exists():
            raise
        return load_diffusers_vae_folder(Path(name).expanduser(), dtype=dtype)  # a file: "not a VAE folder"
    folder = download(key, cache_dir=cache_dir, offline=offline, progress=progress)
    return load_diffusers_vae_folder(folder, dtype=dtype)
