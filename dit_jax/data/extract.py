"""Encode an image source with the SD VAE into ArrayRecord shards of posterior moments (dit_jax/data/latents.py's
format): what `dit-jax extract-latents` (dit_jax/data/cli.py) runs.

    stats = extract(source, vae, out_dir, image_size=256)   # this process's shards; resumable

Each image gets the ADM centre crop, is encoded to the VAE posterior mean and log-variance (with flip=True, so
is its mirror image), and written as one record; store_images also keeps the uint8 crop (REPA). Shards
`latents-00000-of-00128.array_record` (+ `.json` sidecars) are written atomically: a rerun skips the finished
ones. In a multi-process job each process writes shards s with s % process_count == process_index; the records
do not depend on the number of processes.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.models.vae import SD_VAE_SCALE

log = logging.getLogger("dit_jax.data.extract")


def shard_path(out_dir: Path, index: int, count: int) -> Path:
    return out_dir / f"latents-{index:05d}-of-{count:05d}.array_record"


def _encoder(vae: Any) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """A jitted uint8 (B, S, S, 3) -> (mean, logvar) (B, S/8, S/8, 4) float32."""
    from flax import nnx

    graphdef, state = nnx.split(vae)

    @jax.jit
    def encode(state: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        model = nnx.merge(graphdef, state)
        return model.encode(x.astype(jnp.float32) / 127.5 - 1.0)

    return lambda x: tuple(np.asarray(a, np.float32) for a in encode(state, x))


def _shard_records(
    source: Any, indices: range, decode: Any, encode: Callable, batch_size: int, flip: bool, stats: dict,
    store_images: bool = False,
) -> Iterator[dict]:
    """Decode, crop and encode the records of one shard in batches; yields write_latents records."""
    for start in range(indices.start, indices.stop, batch_size):
        elems = [decode.map(source[i]) for i in range(start, min(start + batch_size, indices.stop))]
        good = [e for e in elems if bool(e["ok"])]
        for e in elems:
            if not bool(e["ok"]):
                stats["bad_records"] += 1
                if stats["bad_records"] <= 10:
                    log.warning("skipping unreadable record: %s", source.describe(int(e["key"])))
        if not good:
            continue
        x = np.stack([e["x"] for e in good])
        n = len(x)
        pad = batch_size - n  # fixed batch shape: one compilation
        xb = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
        mean, logvar = encode(xb)
        if flip:
            mean_f, logvar_f = encode(xb[:, :, ::-1])
        for j, e in enumerate(good):
            rec = dict(mean=mean[j], logvar=logvar[j], label=int(e["y"]))
            if flip:
                rec.update(mean_flip=mean_f[j], logvar_flip=logvar_f[j])
            if store_images:
                rec["image"] = x[j]  # the uint8 crop the moments encode (unflipped)
            yield rec
        stats["encoded"] += n


def extract(
    source: Any,
    vae: Any,
    out_dir: str | Path,
    *,
    image_size: int,
    batch_size: int = 64,
    flip: bool = True,
    store_images: bool = False,
    num_shards: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode `source` (records {"key", "label", "image" | "data"} as dit_jax.data.sources give) into shards in
    `out_dir`; store_images also writes each uint8 crop into its record (for REPA). This process writes shards
    s with s % process_count == process_index (default: the JAX job's jax.process_index() / process_count()).
    Returns this process's {"shards_written", "shards_skipped", "encoded", "bad_records"}."""
    from dit_jax.data.latents import write_latents
    from dit_jax.data.transforms import DecodeImage

    if image_size < 8 or image_size % 8:
        raise ValueError(f"image_size must be a positive multiple of 8 (the VAE downsamples by 8), got {image_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_shards is not None and num_shards < 1:
        raise ValueError(f"num_shards must be positive (or None: one per 10,000 records), got {num_shards}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(source)
    if n == 0:
        raise ValueError(f"{source!r} has no records")
    num_shards = num_shards or max(1, math.ceil(n / 10_000))
    per_shard = math.ceil(n / num_shards)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    tag = f"[p{process_index}/{process_count}] " if process_count > 1 else ""
    # Finished shards (of every process, so that all processes refuse a mismatch alike, before any work).
    others = sorted(p.name for p in out_dir.glob("latents-*-of-*.array_record")
                    if not p.name.endswith(f"-of-{num_shards:05d}.array_record"))
    if others:
        raise ValueError(
            f"{out_dir} holds shards of a run with another shard count ({others[0]}; this run writes {num_shards}): "
            "a folder of latents is one run's shards, so use a new --out (or delete the old shards, or rerun "
            "with the old --num-shards)")
    done = {s for s in range(num_shards)
            if _finished(shard_path(out_dir, s, num_shards), flip, store_images, image_size)}
    decode = DecodeImage(image_size, 3)
    encode = _encoder(vae)
    stats = dict(shards_written=0, shards_skipped=0, encoded=0, bad_records=0)
    mine = [s for s in range(num_shards) if s % process_count == process_index]
    t0 = time.perf_counter()
    for k, s in enumerate(mine):
        path = shard_path(out_dir, s, num_shards)
        if s in done:
            stats["shards_skipped"] += 1
            continue
        indices = range(s * per_shard, min((s + 1) * per_shard, n))
        if len(indices) == 0:
            continue
        records = _shard_records(source, indices, decode, encode, batch_size, flip, stats, store_images)
        first = next(records, None)
        if first is None:
            raise ValueError(
                f"none of the {len(indices)} images of shard {s} could be read or decoded (e.g. "
                f"{source.describe(indices.start)}): check that the source holds images (.png, .jpg, ...) "
                "that open with PIL")
        shard_meta = dict(meta or {}, image_size=image_size, scale=SD_VAE_SCALE, shard=s, num_shards=num_shards,
                          source=repr(source))
        write_latents(path, itertools.chain([first], records), meta=shard_meta)
        stats["shards_written"] += 1
        if progress:
            rate = stats["encoded"] / max(time.perf_counter() - t0, 1e-9)
            left = (len(mine) - k - 1) * per_shard / max(rate, 1e-9)
            print(f"{tag}shard {s + 1}/{num_shards}: {stats['encoded']} images encoded ({rate:.1f}/s, "
                  f"~{left / 60:.0f} min left), {stats['bad_records']} unreadable skipped", flush=True)
    return stats


def _finished(path: Path, flip: bool, store_images: bool, image_size: int) -> bool:
    """True if `path` is a finished shard (with its sidecar) written with these options; ValueError if it was
    written with others."""
    from dit_jax.data.latents import read_latents_meta

    if not (path.exists() and Path(str(path) + ".json").exists()):
        return False
    done = read_latents_meta(path)
    was = (bool(done.get("flip")), bool(done.get("images", False)), done.get("image_size"))
    if was != (flip, store_images, image_size):
        raise ValueError(
            f"{path} was written with flip={was[0]}, images={was[1]}, image_size={was[2]}; this run asks for "
            f"flip={flip}, images={store_images}, image_size={image_size}: use a new --out (or delete the old "
            "shards)")
    return True
