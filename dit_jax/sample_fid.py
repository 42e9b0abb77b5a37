"""`dit-jax sample-fid`: N samples (50,000 by default) for FID, written as the ADM evaluator's `.npz`.

    dit-jax sample-fid                                   # DiT-XL/2 256 px, cfg 1.5, 250 DDPM steps, 50k samples
    dit-jax sample-fid --cfg-scale 1.0 --num-samples 10000 --sample-dir samples
    dit-jax evaluate samples/DiT-XL-2-256x256-size-256-vae-ema-cfg-1.5-seed-0.npz VIRTUAL_imagenet256_labeled.npz

Defaults follow the official sample_ddp.py (cfg 1.5, vae ema, 250 steps, 32 per device). Two differences:
- Labels are class-balanced (N/num_classes of each) and then shuffled with the seed, instead of drawn
  uniformly at random: the evaluator's Inception Score uses consecutive 5,000-sample splits, so the order
  must be random, and balanced classes remove one source of run-to-run noise.
- Sample i uses the key fold_in(key(seed), i) (see dit_jax.sample), so the result does not depend on the
  batch size, the device count or where an interrupted run resumed.

Work is written shard by shard (`<folder>/shard_00000.npz` ...: images, labels, indices), each atomically; a
rerun with the same settings skips finished shards, so an interrupted or preempted run loses at most one shard
per process. Processes of a multi-host job (a TPU pod, --coordinator/--num-processes/--process-id, or
launch/local/multiprocess.sh) take shards round-robin and sample on their local devices; the first process writes
the manifest and assembles `<folder>.npz` (key arr_0, uint8 (N, H, W, 3), written as a stream) at the end. Each
sample depends only on (seed, index, settings, per-device batch), so the .npz is the same, byte for byte, on
any number of processes with the same --per-device-batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dit_jax import distributed
from dit_jax.errors import UsageError
from dit_jax.evaluate.npz import write_npz_stream
from dit_jax.paths import atomic_write, check_output_file, check_output_folder, write_text_atomic
from dit_jax.sample import Sampler, SampleSettings, data_mesh, example_keys

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
    if not distributed.all_agree("dit_jax/sample-fid/shards", failed is None):  # also the barrier: every shard is written
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


# ----------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------
def register(subparsers: Any, name: str) -> argparse.ArgumentParser:
    from dit_jax.sample_cli import add_common_args

    p = subparsers.add_parser(name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, cfg_scale=1.5, vae="ema")
    p.add_argument("--num-samples", type=int, default=50_000, help="default 50,000")
    p.add_argument("--per-device-batch", type=int, default=32, help="samples per device per call (default 32)")
    p.add_argument("--seed", type=int, default=0, help="global seed (labels and noise)")
    p.add_argument("--sample-dir", default="samples", help="parent folder of the shard folder and the .npz")
    p.add_argument("--overwrite", action="store_true", help="discard shards made with other settings")
    distributed.add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from dit_jax.sample_cli import check_common_args, load_decoder, load_model, settings_from_args, vae_name

    t0 = time.perf_counter()
    check_common_args(args)
    check_counts(args.num_samples, args.per_device_batch)
    distributed.from_args(args)  # before any other JAX call
    check_output_folder(args.sample_dir, "--sample-dir")
    loaded = load_model(args.ckpt, image_size=args.image_size or 256, dtype=args.dtype, cache_dir=args.cache_dir,
                        offline=args.offline, progress=args.progress)
    settings = settings_from_args(args, loaded)
    mesh = data_mesh(jax.local_devices())
    vae = vae_name(loaded, args.vae, args.default_vae)
    decoder = load_decoder(loaded, vae, mesh, cache_dir=args.cache_dir, offline=args.offline, progress=args.progress)
    sampler = Sampler.for_model(loaded.model, settings, mesh=mesh)
    folder = Path(args.sample_dir) / (f"{loaded.name}-size-{loaded.image_size}-vae-{Path(vae).name}-"
                                      f"cfg-{float(settings.cfg_scale)}-seed-{args.seed}")
    manifest = dict(model=loaded.name, image_size=loaded.image_size, vae=vae,
                    settings=_jsonable(settings), dtype=args.dtype)
    where = f"{jax.process_count()} processes x {mesh.size}" if jax.process_count() > 1 else f"{mesh.size}"
    print(f"{distributed.process_tag()}sampling {args.num_samples:,} images from {loaded.name} into {folder}/ on "
          f"{where} device(s)", flush=True)
    out = sample_fid(sampler, decoder, folder, num_samples=args.num_samples, seed=args.seed,
                     shard_size=args.per_device_batch * mesh.size, manifest=manifest, overwrite=args.overwrite,
                     progress=args.progress)
    if out is not None:
        print(f"wrote {out.resolve()} (arr_0 uint8 ({args.num_samples}, {loaded.image_size}, {loaded.image_size}, "
              f"C)) in {time.perf_counter() - t0:.0f}s")
    return 0


def check_counts(num_samples: int, per_device_batch: int) -> None:
    """UsageError for a --num-samples or --per-device-batch below 1 (shared with `sample-ddt --num-samples`)."""
    if num_samples < 1:
        raise UsageError(f"--num-samples {num_samples}: expected a positive number of samples (FID uses 50,000)")
    if per_device_batch < 1:
        raise UsageError(f"--per-device-batch {per_device_batch}: expected a positive number of samples per device")


def _jsonable(settings: SampleSettings) -> dict[str, Any]:
    return dataclasses.asdict(settings)


if __name__ == "__main__":  # pragma: no cover
    from dit_jax.cli import main

    sys.exit(main(["sample-fid", *sys.argv[1:]]))
