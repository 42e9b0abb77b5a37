"""`dit-jax download`: fetch the official DiT-XL/2 checkpoints and the SD VAEs into the cache.

    dit-jax download --list                          what is known, and what is cached
    dit-jax download DiT-XL-2-256x256.pt ema         download (and convert the DiT to Orbax)
    dit-jax download --all --cache-dir /data/dit     everything, into another cache
    dit-jax download --offline --all                 check the cached files (sha256) without the network
"""

from __future__ import annotations

import argparse
import errno
from pathlib import Path
from typing import Any

from dit_jax.errors import UsageError
from dit_jax.weights import registry
from dit_jax.weights.transfer import read_record
from dit_jax.weights.pretrained import converted_dit, download
from dit_jax.weights.registry import ALIASES, REGISTRY, Entry, UnknownWeightsError, resolve_name


def register(subparsers: Any, name: str) -> argparse.ArgumentParser:
    """Add the `download` subcommand; its `func(args) -> int` is `run`."""
    p = subparsers.add_parser(
        name,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME", help="a registry name or alias (see --list), e.g. DiT-XL/2-256, ema")
    p.add_argument("--all", action="store_true", help="download every registry entry")
    p.add_argument("--list", action="store_true", help="list the registry with what is cached, and exit")
    p.add_argument("--cache-dir", help="cache root (default $DIT_JAX_CACHE, else ~/.cache/dit_jax)")
    p.add_argument(
        "--offline", action="store_true", help="no network: only check what is cached (also DIT_JAX_OFFLINE=1)"
    )
    p.add_argument("--force", action="store_true", help="download (and convert) again even when cached")
    p.add_argument(
        "--no-convert", action="store_true", help="do not convert DiT checkpoints to Orbax after downloading"
    )
    p.set_defaults(func=run)
    return p


def _status(entry: Entry, root: Path) -> str:
    """'converted', 'downloaded', 'partial' or 'not cached' (from file presence alone: nothing is hashed)."""
    folder = entry.folder(root)
    present = [(folder / f.filename).is_file() for f in entry.files]
    if entry.kind == "dit" and (entry.converted_folder(root) / "dit_config.json").is_file():
        return "converted" + (" + downloaded" if all(present) else "")
    if all(present):
        return "downloaded"
    return "partial" if any(present) else "not cached"


def list_registry(root: Path) -> str:
    """The table printed by --list: one block per entry with status, description, cached sha256s and URLs."""
    lines = [f"cache: {root}"]
    for key, entry in REGISTRY.items():
        aliases = sorted(a for a, k in ALIASES.items() if k == key)
        lines.append(f"{key:<22} {entry.kind:<4} {_status(entry, root):<24} {entry.description}")
        if aliases:
            lines.append(f"    aliases: {', '.join(aliases)}")
        for f in entry.files:
            digest = read_record(entry.folder(root) / f.filename)
            lines.append(f"    {f.resolved_url()}" + (f"  sha256 {digest}" if digest else ""))
    return "\n".join(lines)


def check_cache_root(root: Path) -> None:
    """NotADirectoryError when the cache root is a file (before any network access)."""
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory (the cache root must be a folder)", str(root))


def run(args: argparse.Namespace) -> int:
    """Carry out `dit-jax download`; 0 on success. Errors are raised: dit_jax.errors prints
    `dit-jax download: error: ...` and exits 1 (2 for a bad combination of arguments)."""
    root = registry.cache_dir(args.cache_dir)
    if args.list:
        if args.names or args.all:
            raise UsageError("--list takes no NAME and no --all: it lists every entry")
        print(list_registry(root))
        return 0
    if args.all and args.names:
        raise UsageError("pass NAMEs or --all, not both")
    names = list(REGISTRY) if args.all else list(args.names)
    if not names:
        raise UsageError("name what to download (see --list), or pass --all")
    offline = True if args.offline else None
    if args.force and registry.is_offline(offline):
        raise UsageError("--force downloads again, which offline mode (--offline, DIT_JAX_OFFLINE=1 or "
                         "HF_HUB_OFFLINE=1) forbids: drop one of them")
    for n in names:
        if n not in REGISTRY and n not in ALIASES and Path(n).expanduser().exists():
            raise UnknownWeightsError(f"{n} is a local path: `dit-jax download` fetches the registry's weights (see "
                                      "--list); convert a local checkpoint with `dit-jax convert`")
    keys = [resolve_name(n) for n in names]  # all names checked before the first download
    check_cache_root(root)
    for key in dict.fromkeys(keys):
        path = download(key, cache_dir=root, offline=offline, force=args.force, progress=True)
        print(f"{key}: {path}")
        if REGISTRY[key].kind == "dit" and not args.no_convert:
            out = converted_dit(key, cache_dir=root, offline=offline, reconvert=args.force)
            print(f"{key}: converted -> {out}")
    return 0
