"""ADM evaluation-suite `.npz` files: sample batches and reference batches (VIRTUAL_imagenet256_labeled.npz, ...).

Layout (guided-diffusion evaluations/evaluator.py and scripts/image_sample.py, which writes np.savez(path, arr)):

    arr_0            uint8 (N, H, W, 3) images, NHWC             (samples and references)
    mu, sigma        float (2048,), (2048, 2048) pool_3 stats      (reference batches, optional)
    mu_s, sigma_s    float (2023,), (2023, 2023) spatial stats     (present whenever mu is)

Reading streams arr_0 in batches straight out of the zip member, as ADM's StreamingNpzArrayReader does, so a
50,000 x 256 x 256 x 3 file (9.8 GB) never sits in memory; ADM's reader accepts .npy headers of version 1.0
and 2.0 and falls back to loading the whole array for Fortran-ordered data, and so do we. Statistics are read
with np.load (lazy per key, allow_pickle=False). ADM uses mu/sigma/mu_s/sigma_s when "mu" is present and computes
them from arr_0 otherwise; arr_0 is always needed (precision and recall use its activations).

Writing: write_samples_npz produces exactly what np.savez(path, images) does (one uncompressed member
arr_0.npy, .npy format 1.0), atomically (temporary file in the same folder, then rename).
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from dit_jax.evaluate.fid import FIDStatistics
from dit_jax.paths import atomic_write, check_input_file

IMAGES_KEY = "arr_0"
STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


class NpzFormatError(ValueError):
    """An .npz file is missing, unreadable, or does not hold what the ADM evaluator expects."""


# ----------------------------------------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------------------------------------
def _read_exact(f: IO[bytes], size: int, path: Path) -> bytes:
    """Read exactly `size` bytes (a zip member may return short reads)."""
    chunks, got = [], 0
    while got < size:
        chunk = f.read(size - got)
        if not chunk:
            raise NpzFormatError(f"{path}: truncated file (expected {size} more bytes of array data, got {got})")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _check_file(p: Path) -> None:
    """NpzFormatError unless `p` is an existing file (not a folder)."""
    check_input_file(p, what="an .npz file", error=NpzFormatError)


@contextlib.contextmanager
def _open_member(path: str | os.PathLike, name: str) -> Iterator[IO[bytes]]:
    p = Path(path)
    _check_file(p)
    try:
        zf = zipfile.ZipFile(p, "r")
    except PermissionError:
        raise  # the file is fine, its permissions are not: the OSError names it
    except (zipfile.BadZipFile, OSError) as e:
        raise NpzFormatError(f"{p}: not an .npz file, or a truncated one ({e}); expected what np.savez writes") from e
    with zf:
        if f"{name}.npy" not in zf.namelist():
            raise NpzFormatError(
                f"{p}: missing {name} in npz file (it holds {sorted(zf.namelist())}); the images must be saved as "
                f"np.savez(path, images), which names them {name}"
            )
        with zf.open(f"{name}.npy", "r") as f:
            yield f


def _read_header(f: IO[bytes], path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(f)
    except ValueError as e:
        raise NpzFormatError(f"{path}: corrupt .npy header ({e})") from e
    raise NpzFormatError(f"{path}: unsupported .npy format version {version}")


class NpzArrayReader:
    """One array of an .npz, read in consecutive batches: shape, dtype, batches(batch_size) -> (b, ...) arrays.

    Use as a context manager (`with open_npz_array(path) as r:`); the zip member is read sequentially.
    """

    def __init__(self, path: Path, f: IO[bytes] | None, shape: tuple[int, ...], dtype: np.dtype,
                 whole: np.ndarray | None = None):
        self.path, self._f, self.shape, self.dtype, self._whole = path, f, tuple(shape), dtype, whole
        self._next = 0

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def read_batch(self, batch_size: int) -> np.ndarray | None:
        """The next min(batch_size, remaining) rows, or None at the end."""
        if self._next >= len(self):
            return None
        b = min(batch_size, len(self) - self._next)
        if self._whole is not None:
            out = self._whole[self._next : self._next + b]
        else:
            count = b * int(np.prod(self.shape[1:], dtype=np.int64))
            data = _read_exact(self._f, count * self.dtype.itemsize, self.path)
            out = np.frombuffer(data, dtype=self.dtype).reshape((b, *self.shape[1:]))
        self._next += b
        return out

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        while (batch := self.read_batch(batch_size)) is not None:
            yield batch


@contextlib.contextmanager
def open_npz_array(path: str | os.PathLike, name: str = IMAGES_KEY) -> Iterator[NpzArrayReader]:
    """Streaming reader of `name` in the .npz at `path` (ADM open_npz_array)."""
    p = Path(path)
    with _open_member(p, name) as f:
        shape, fortran, dtype = _read_header(f, p)
        if dtype.hasobject:
            raise NpzFormatError(f"{p}: {name} holds Python objects (pickled); refusing to read it")
        if fortran:  # ADM: MemoryNpzArrayReader; np.load without pickles
            with np.load(p, allow_pickle=False) as z:
                yield NpzArrayReader(p, None, shape, dtype, whole=z[name])
        else:
            yield NpzArrayReader(p, f, shape, dtype)


def check_images_header(shape: tuple[int, ...], dtype: np.dtype, path: str | os.PathLike = "images") -> None:
    """NpzFormatError unless (shape, dtype) is uint8 (N >= 1, H, W, 3) NHWC, what the Inception graph takes."""
    problems = []
    if np.dtype(dtype) != np.uint8:
        problems.append(f"dtype {np.dtype(dtype)} (expected uint8 in [0, 255])")
    if len(shape) != 4:
        problems.append(f"shape {tuple(shape)} (expected 4-D (N, H, W, 3), NHWC)")
    elif shape[-1] != 3:
        hint = " (NCHW? the ADM format is NHWC)" if shape[1] == 3 else ""
        problems.append(f"shape {tuple(shape)} has {shape[-1]} channels (expected 3, RGB){hint}")
    elif shape[0] < 1 or shape[1] < 1 or shape[2] < 1:
        problems.append(f"shape {tuple(shape)} is empty")
    if problems:
        raise NpzFormatError(f"{path}: {IMAGES_KEY} is not what the ADM evaluator reads: " + "; ".join(problems))


def read_images_header(path: str | os.PathLike) -> tuple[int, ...]:
    """Shape (N, H, W, 3) of arr_0 after checking it is uint8 NHWC RGB (reads only the header)."""
    with open_npz_array(path) as r:
        check_images_header(r.shape, r.dtype, path)
        return r.shape


def iter_image_batches(path: str | os.PathLike, batch_size: int) -> Iterator[np.ndarray]:
    """arr_0 of `path` in consecutive uint8 (b, H, W, 3) batches, checked as in check_images_header."""
    with open_npz_array(path) as r:
        check_images_header(r.shape, r.dtype, path)
        yield from r.batches(batch_size)


def read_reference_statistics(path: str | os.PathLike) -> tuple[FIDStatistics, FIDStatistics] | None:
    """(pool stats, spatial stats) stored in the .npz (mu, sigma, mu_s, sigma_s), or None when it has no "mu"
    (ADM Evaluator.read_statistics then computes them from the activations of arr_0)."""
    p = Path(path)
    _check_file(p)
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = set(z.files)
            if "mu" not in keys:
                return None
            missing = [k for k in STATS_KEYS if k not in keys]
            if missing:
                raise NpzFormatError(f"{p}: has 'mu' but not {missing}; ADM reads all of {list(STATS_KEYS)}")
            arrays = {k: np.asarray(z[k]) for k in STATS_KEYS}
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        if isinstance(e, NpzFormatError):
            raise
        raise NpzFormatError(f"{p}: cannot read the reference statistics ({e})") from e
    for mu_key, sigma_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
        mu, sigma = arrays[mu_key], arrays[sigma_key]
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise NpzFormatError(f"{p}: {mu_key} {mu.shape} and {sigma_key} {sigma.shape} are not (D,) and (D, D)")
    return (FIDStatistics(arrays["mu"], arrays["sigma"]), FIDStatistics(arrays["mu_s"], arrays["sigma_s"]))


# ----------------------------------------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------------------------------------
def _atomic_savez(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    path = Path(path)
    with atomic_write(path, "wb", fsync=True) as f:  # a file object: np.savez does not append ".npz" to it
        np.savez(f, **arrays)
    return path


def _checked_images(images: Any) -> np.ndarray:
    arr = np.asarray(images)
    check_images_header(arr.shape, arr.dtype)
    return np.ascontiguousarray(arr)


def write_samples_npz(path: str | os.PathLike, images: np.ndarray) -> Path:
    """Write uint8 (N, H, W, 3) images as the ADM sample batch: exactly np.savez(path, images) (key arr_0),
    atomically. The name is used as given (no ".npz" is appended). Returns the path."""
    return _atomic_savez(path, {IMAGES_KEY: _checked_images(images)})


def write_reference_npz(
    path: str | os.PathLike, images: np.ndarray, pool: FIDStatistics | None = None,
    spatial: FIDStatistics | None = None,
) -> Path:
    """Write a reference batch: arr_0 (uint8 NHWC) and, when given, mu/sigma (pool) and mu_s/sigma_s (spatial)
    as float64, atomically. Both statistics or neither (ADM reads all four keys when "mu" is present)."""
    arrays: dict[str, np.ndarray] = {IMAGES_KEY: _checked_images(images)}
    if (pool is None) != (spatial is None):
        raise ValueError("give both the pool and the spatial statistics, or neither")
    if pool is not None and spatial is not None:
        arrays.update(mu=np.asarray(pool.mu, np.float64), sigma=np.asarray(pool.sigma, np.float64),
                      mu_s=np.asarray(spatial.mu, np.float64), sigma_s=np.asarray(spatial.sigma, np.float64))
    return _atomic_savez(path, arrays)


# ----------------------------------------------------------------------------------------------------------
def write_npz_stream(path: str | os.PathLike, chunks: Iterable[np.ndarray], shape: tuple[int, ...]) -> Path:
    """Write `arr_0` (uint8, `shape`) from consecutive chunks into an uncompressed .npz, as np.savez lays it out,
    without holding the whole array (50k x 256 x 256 x 3 is 9.8 GB). Atomic: temp file, then rename."""
    path = Path(path)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    written = 0
    with atomic_write(path, "wb") as out:
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                for chunk in chunks:
                    chunk = np.ascontiguousarray(chunk, dtype=np.uint8)
                    if chunk.shape[1:] != tuple(shape[1:]):
                        raise ValueError(f"chunk of shape {chunk.shape} does not fit {shape}")
                    f.write(chunk.tobytes())
                    written += len(chunk)
        if written != shape[0]:
            raise ValueError(f"wrote {written} images, expected {shape[0]}")
    return path
