"""What can be downloaded, from where, and where it goes: the registry, name aliases, the cache folder and the
offline switch. Nothing here touches the network."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# The addresses the official code uses: facebookresearch/DiT download.py and sample.py
# (AutoencoderKL.from_pretrained(f"stabilityai/sd-vae-ft-{args.vae}")).
DEFAULT_DIT_URL_BASE = "https://dl.fbaipublicfiles.com/DiT/models"
DEFAULT_HF_URL_BASE = "https://huggingface.co"
DIT_URL_ENV = "DIT_JAX_DIT_URL_BASE"  # mirror of dl.fbaipublicfiles.com/DiT/models
HF_URL_ENV = "DIT_JAX_HF_URL_BASE"  # mirror of huggingface.co (HF_ENDPOINT is honoured too)
CACHE_ENV = "DIT_JAX_CACHE"
OFFLINE_ENVS = ("DIT_JAX_OFFLINE", "HF_HUB_OFFLINE")
_TRUE = ("1", "true", "yes", "on")


class UnknownWeightsError(ValueError):
    """A name that is neither a registry entry, an alias, nor an existing path."""


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One file to fetch. `url` may start with "{dit}" or "{hf}", replaced by the (overridable) URL bases.

    size / sha256: pinned values, enforced when given (None: learnt from the server and the first download).
    etag_is_sha256: the first server's ETag is the file's sha256 when it is 64 hex digits (Hugging Face LFS).
    """

    filename: str
    url: str
    size: int | None = None
    sha256: str | None = None
    etag_is_sha256: bool = False

    def resolved_url(self) -> str:
        """The URL with the {dit} / {hf} placeholders replaced by the current URL bases."""
        return self.url.replace("{dit}", dit_url_base()).replace("{hf}", hf_url_base())


@dataclasses.dataclass(frozen=True)
class Entry:
    """A downloadable set of weights.

    kind "dit": one checkpoint file, stored as <cache>/downloads/<filename> and converted (dit_jax.convert.folder
    .convert with `convert_options`) into <cache>/converted/<stem>. kind "vae": a diffusers folder, stored as
    <cache>/vae/<name>/ (config.json + safetensors).
    """

    name: str
    kind: str
    files: tuple[RemoteFile, ...]
    description: str = ""
    convert_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def stem(self) -> str:
        """The name without a checkpoint suffix: the converted folder's name."""
        for suffix in (".pt", ".pth", ".safetensors"):
            if self.name.endswith(suffix):
                return self.name[: -len(suffix)]
        return self.name

    def folder(self, root: Path) -> Path:
        """Where this entry's files are stored under the cache root."""
        return root / "downloads" if self.kind == "dit" else root / self.kind / self.name

    def converted_folder(self, root: Path) -> Path:
        """Where a DiT entry's converted (Orbax) copy lives."""
        return root / "converted" / self.stem


def _dit_entry(size: int) -> Entry:
    name = f"DiT-XL-2-{size}x{size}.pt"
    return Entry(
        name=name,
        kind="dit",
        files=(RemoteFile(name, "{dit}/" + name),),
        description=f"official DiT-XL/2 EMA weights, {size}x{size} ImageNet (facebookresearch/DiT)",
        convert_options={"variant": "DiT-XL/2", "image_size": size},
    )


def _vae_entry(which: str) -> Entry:
    name = f"sd-vae-ft-{which}"
    base = "{hf}/stabilityai/" + name + "/resolve/main/"
    files = tuple(
        RemoteFile(f, base + f, etag_is_sha256=True) for f in ("config.json", "diffusion_pytorch_model.safetensors")
    )
    return Entry(name=name, kind="vae", files=files, description=f"SD VAE fine-tuned ({which}), stabilityai/{name}")


# No size or sha256 is pinned: the publishers state none that we could check. Integrity comes from the Hugging
# Face headers (X-Linked-Etag/X-Linked-Size) where given and from the sha256 recorded at the first download.
REGISTRY: dict[str, Entry] = {
    e.name: e for e in (_dit_entry(256), _dit_entry(512), _vae_entry("ema"), _vae_entry("mse"))
}
ALIASES = {
    "DiT-XL/2-256": "DiT-XL-2-256x256.pt",
    "DiT-XL/2-512": "DiT-XL-2-512x512.pt",
    "DiT-XL-2-256": "DiT-XL-2-256x256.pt",
    "DiT-XL-2-512": "DiT-XL-2-512x512.pt",
    "ema": "sd-vae-ft-ema",
    "mse": "sd-vae-ft-mse",
}


def resolve_name(name: str, kind: str | None = None, *, paths: bool = False) -> str:
    """The registry key for `name`: a key, a key without ".pt", an alias ("DiT-XL/2-256", "ema"), or
    "stabilityai/<key>". UnknownWeightsError listing the known names otherwise (or when of another kind).
    paths: the caller also accepts the path of a local file or folder (the error then says so, and calls a
    name that looks like a path a missing path)."""
    candidates = [name, name + ".pt", ALIASES.get(name, "")]
    if name.startswith("stabilityai/"):
        candidates.append(name[len("stabilityai/"):])
    for key in candidates:
        if key in REGISTRY and (kind is None or REGISTRY[key].kind == kind):
            return key
    known = sorted(k for k, e in REGISTRY.items() if kind is None or e.kind == kind)
    aliases = sorted(a for a, k in ALIASES.items() if k in known)
    what = f"{kind} weights" if kind else "weights"
    names = f"known names are {known} (aliases {aliases})"
    if paths and (os.sep in name or "/" in name or name.startswith((".", "~"))):
        raise UnknownWeightsError(f"{name}: no such file or folder (nor one of the {what} names: {names}): "
                                  "check the path")
    raise UnknownWeightsError(
        f"unknown {what} {name!r}: {names}" + ("; or pass the path of a local file or folder" if paths else "")
    )


# ----------------------------------------------------------------------------------------------------------
# Environment.
# ----------------------------------------------------------------------------------------------------------
def dit_url_base() -> str:
    """Base URL of the official DiT checkpoints ($DIT_JAX_DIT_URL_BASE overrides)."""
    return os.environ.get(DIT_URL_ENV, DEFAULT_DIT_URL_BASE).rstrip("/")


def hf_url_base() -> str:
    """Base URL of the Hugging Face hub ($DIT_JAX_HF_URL_BASE, else $HF_ENDPOINT, else huggingface.co)."""
    return (os.environ.get(HF_URL_ENV) or os.environ.get("HF_ENDPOINT") or DEFAULT_HF_URL_BASE).rstrip("/")


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache root: `path` if given, else $DIT_JAX_CACHE, else $XDG_CACHE_HOME/dit_jax, else ~/.cache/dit_jax.
    Not created here."""
    if path is not None:
        return Path(path).expanduser().absolute()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "dit_jax").absolute()


def is_offline(offline: bool | None = None) -> bool:
    """`offline` if given, else whether $DIT_JAX_OFFLINE or $HF_HUB_OFFLINE is set to 1/true/yes/on."""
    if offline is not None:
        return bool(offline)
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in OFFLINE_ENVS)
