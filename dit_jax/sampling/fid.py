"""N samples for FID, written shard by shard and assembled into the ADM evaluator's `.npz` (`dit-jax sample-fid`).

Defaults follow the official sample_ddp.py (cfg 1.5, vae ema, 250 steps, 32 per device). Two differences:
- Labels are class-balanced (N/num_classes of each) and then shuffled with the seed, instead of drawn
  uniformly at random: the evaluator's Inception Score uses consecutive 5,000-sample splits, so the order
  must be random, and balanced classes remove one source of run-to-run noise.
- Sample i uses the key fold_in(key(seed), i) (dit_jax.sampling.sampler), so the result does not depend on the
  batch size, the device count or where an interrupted run resumed.

Work is written shard by shard (`<folder>/shard_00000.npz` ...: images, labels, indices), each atomically; a
rerun with the same settings skips finished shards, so an interrupted or preempted run loses at most one shard
per process. Processes of a multi-host job take shards round-robin and sample on their local devices; the first
process writes the manifest and assembles `<folder>.npz` (key arr_0, uint8 (N, H, W, 3), written as a stream) at
the end. Each sample depends only on (seed, index, settings, per-device batch), so the .npz is the same, byte for
byte, on any number of processes with the same --per-device-batch.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dit_jax import distributed
from dit_jax.evaluate.npz import write_npz_stream
from dit_jax.paths import atomic_write, check_output_file, write_text_atomic
from dit_jax.sampling.sampler import Sampler, example_keys

MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------------------------------------
# Labels, shards, manifest.
# ----------------------------------------------------------------------------------------------------------
def fid_labels(num_samples: int, num_classes: int, seed: int) -> np.ndarray:
    """(num_samples,) int32: each class num_samples // num_classes times (the first num_samples % num_classes
    classes once more), in an order shuffled by `seed`."""
    balanced = np.arange(num_samples, dtype=np.int64) % num_classes
    return np.random.default_rng(seed).permutation(balanced).astype(np.int32)


def shard_path(folder: Path, k: int) -> Path:
    return folder / f"shard_{k:05d}.npz"


def shard_ranges(num_samples: int, shard_size: int) -> list[range]:
    return [range(s, min(s + shard_size, num_samples)) for s in range(0, num_samples, shard_size)]


def read_shard(path: Path, expected: range, image_shape: tuple[int, ...] | None = None) -> np.ndarray | None:
    """The shard's uint8 images if `path` is a complete shard for exactly `expected` indices, else None."""
    try:
        with np.load(path) as f:
            images, indices = f["images"], f["indices"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None
    ok = (
        images.dtype == np.uint8
        and images.ndim == 4
        and len(images) == len(expected)
        and np.array_equal(indices, np.arange(expected.start, expected.stop))
        and (image_shape is None or images.shape[1:] == tuple(image_shape))
    )
    return images if ok else None


def write_shard(path: Path, images: np.ndarray, labels: np.ndarray, indices: range) -> None:
    with atomic_write(path, "wb") as f:  # a full disk, an interrupt: no half-written file left behind
        np.savez(f, images=images, labels=labels, indices=np.arange(indices.start, indices.stop))


def check_manifest(folder: Path, manifest: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """Write the manifest for a new folder; for an existing one, refuse settings that differ. Returns the manifest
    in force: a resumed folder keeps its shard_size (the run may resume on another number of devices)."""
    file = folder / MANIFEST
    if file.exists() and not overwrite:
        try:
            old = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{file} is unreadable ({e}); pass --overwrite to start again") from e
        diff = {k: (old.get(k), v) for k, v in manifest.items() if k != "shard_size" and old.get(k) != v}
        if diff:
            listing = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"{folder} holds samples made with other settings ({listing}); "
                             "use another --sample-dir or pass --overwrite to start again")
        return old
    if overwrite:
        for old in folder.glob("shard_*.npz"):
            old.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(file, json.dumps(manifest, indent=2) + "\n")
    return manifest


# ----------------------------------------------------------------------------------------------------------
# Sampling.
# ----------------------------------------------------------------------------------------------------------
def sample_fid(
    sampler: Sampler,
    decode: Any,
    folder: str | os.PathLike,
    *,
    num_samples: int,
    seed: int,
    shard_size: int,
    manifest: dict[str, Any],
    overwrite: bool = False,
    progress: bool = True,
) -> Path | None:
    """Sample every missing shard of this process, then (first process) assemble `<folder>.npz`.

    sampler: a Sampler for the model; decode: samples -> uint8 (n, H, W, 3). Returns the .npz path on the
    first process, None on the others."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    check_output_file(f"{folder}.npz", "--sample-dir: the samples' .npz")  # found now, not after hours of sampling
    labels = fid_labels(num_samples, sampler.num_classes, seed)
    manifest = dict(manifest, num_samples=num_samples, seed=seed, shard_size=shard_size, labels="balanced-shuffled")
    refused: OSError | ValueError | None = None
    if jax.process_index() == 0:  # the only writer of the manifest (and the only one to clear old shards)
        try:
            check_manifest(folder, manifest, overwrite)
        except (OSError, ValueError) as e:
            refused = e
    # every process learns whether process 0 refused the folder (a plain barrier would leave the others waiting)
    if not distributed.all_agree("dit_jax/sample-fid/manifest", refused is None):
        raise refused or ValueError(f"process 0 refused {folder} (see its error)")
    try:
        shard_size = int(json.loads((folder / MANIFEST).read_text())["shard_size"])
        seen = True
    except (OSError, ValueError, KeyError) as e:
        if jax.process_count() == 1:
            raise ValueError(f"{folder / MANIFEST} is unreadable ({e})") from e
        seen = False
    if not distributed.all_agree("dit_jax/sample-fid/manifest-seen", seen):
        raise ValueError(f"{folder / MANIFEST} written by process 0 is not visible to every process: --sample-dir "
                         "must be a folder that all processes share (the same file system)")
    ranges = shard_ranges(num_samples, shard_size)
    mine = [k for k in range(len(ranges)) if k % jax.process_count() == jax.process_index()]
    todo = [k for k in mine if read_shard(shard_path(folder, k), ranges[k]) is None]
    done = sum(len(ranges[k]) for k in mine) - sum(len(ranges[k]) for k in todo)
    tag = distributed.process_tag()
    bar = tqdm(total=sum(len(ranges[k]) for k in mine), initial=done, unit="img", disable=not progress,
               desc=f"{tag}sample-fid")
    if tag:
        print(f"{tag}{len(mine)} of {len(ranges)} shards are this process's; {len(mine) - len(todo)} already done",
              flush=True)
    failed: OSError | ValueError | None = None
    try:
        for k in todo:
            r = ranges[k]
            idx = np.arange(r.start, r.stop)
            latents = sampler(labels[idx], example_keys(seed, idx))
            write_shard(shard_path(folder, k), decode(latents), labels[idx], r)
            bar.update(len(r))
            if tag and not progress:
                print(f"{tag}wrote {shard_path(folder, k).name} (samples {r.start}..{r.stop - 1})", flush=True)
    except (OSError, ValueError) as e:  # e.g. a full disk: the others learn of it at the barrier below
        failed = e
    bar.close()
    # also the barrier: every shard is written
    if not distributed.all_agree("dit_jax/sample-fid/shards", failed is None):
        raise failed or ValueError("another process failed to write its shards (see its error); rerun to resume")
    ok, out = distributed.on_process_0("dit_jax/sample-fid/assembled", lambda: assemble(folder, ranges))
    if not ok:
        raise ValueError(f"process 0 could not write {folder}.npz (see its error); rerun to assemble it")
    return out


def assemble(folder: Path, ranges: list[range]) -> Path:
    """All shards -> `<folder>.npz` (arr_0 uint8 NHWC, index order)."""
    first = read_shard(shard_path(folder, 0), ranges[0])
    if first is None:
        raise ValueError(f"{shard_path(folder, 0)} is missing or damaged; rerun to resample it")
    shape = (ranges[-1].stop, *first.shape[1:])

    def chunks() -> Iterable[np.ndarray]:
        for k, r in enumerate(ranges):
            images = first if k == 0 else read_shard(shard_path(folder, k), r, first.shape[1:])
            if images is None:
                raise ValueError(f"{shard_path(folder, k)} is missing or damaged; rerun to resample it")
            yield images

    return write_npz_stream(Path(f"{folder}.npz"), chunks(), shape)  # as sample_ddp.py: <folder>.npz
