"""Image helpers: model range [-1, 1] <-> uint8, and PNG grids."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from dit_jax.paths import atomic_write


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] float (N, H, W, C) -> uint8, as the official sample_ddp.py: clip(127.5 x + 128, 0, 255), truncated."""
    return np.clip(127.5 * np.asarray(x, np.float32) + 128.0, 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, nrow: int, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """uint8 (N, H, W, C) -> one uint8 (rows*H', nrow*W', C) image, row-major, `padding` pixels between tiles."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"make_grid takes uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    ncol = max(1, min(nrow, n))
    nrows = -(-n // ncol)
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, ncol)
        y0, x0 = padding + r * (h + padding), padding + k * (w + padding)
        grid[y0 : y0 + h, x0 : x0 + w] = img
    return grid


def _write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """write(f) into a temporary file beside `path`, then rename it over `path` (dit_jax.paths.atomic_write: the
    temporary file is removed if anything fails, a full disk, an interrupt). A folder at `path` is refused before
    anything is written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    with atomic_write(path, "wb") as f:
        write(f)
    return path


def save_png(image: np.ndarray, path: str | os.PathLike, upscale: int = 1) -> Path:
    """Write a uint8 (H, W, C) image (C = 1 or 3) as PNG atomically (temp file, then rename)."""
    image = np.asarray(image)
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if upscale > 1:
        pil = pil.resize((pil.width * upscale, pil.height * upscale), Image.NEAREST)
    return _write_atomically(Path(path), lambda f: pil.save(f, format="PNG"))


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """np.savez(path, **arrays) atomically, to exactly `path` (np.savez given a name adds ".npz" to one without)."""
    return _write_atomically(Path(path), lambda f: np.savez(f, **arrays))  # a file object: no ".npz" added
