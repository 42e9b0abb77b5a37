"""Random-access record sources for grain: TFDS, an image folder, and scikit-learn's bundled digits.

Each source is a grain RandomAccessDataSource (`__len__`, `__getitem__(key)`, a stable `__repr__`,
which the training iterator stores in its state and checks on restore) whose records are dicts with an int
"key" (the record's index in the source). `describe(key)` names a record for warnings about bad ones.
The pre-extracted VAE latents source lives in latents.py.

- TfdsSource: `tfds.data_source(name, split=..., data_dir=...)`, random access over TFDS ArrayRecord
  files, no tensorflow needed. Records {"key", "image": uint8 HWC, "label"}.
- ImageFolderSource: root/<class>/**/*.{png,jpg,jpeg,webp,bmp}, classes = sorted sub-folder names
  -> 0..K-1 (torchvision's ImageFolder, which the official train.py uses). Records {"key", "data":
  the file's bytes, "label"}; decoding happens in transforms.DecodeImage (in grain's workers).
- DigitsSource: sklearn.datasets.load_digits (1797 8x8 grey images, 10 classes, shipped with
  scikit-learn, no download), upsampled once to image_size; records are already final elements.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "TfdsSource",
    "ImageFolderSource",
    "DigitsSource",
    "load_digits_arrays",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class TfdsSource:
    """A TFDS split through `tfds.data_source` (random access, numpy records, no tensorflow).

    A record that TFDS cannot read or decode becomes {"key", "error"} (dropped and counted downstream).
    """

    def __init__(self, name: str = "imagenet2012", split: str = "train", data_dir: str | None = None):
        from dit_jax.errors import import_optional

        # slow import: only when this source is used
        tfds = import_optional("tensorflow_datasets", "a TFDS source", "pip install tensorflow-datasets")

        self.name, self.split, self.data_dir = name, split, data_dir
        where = data_dir or "the TFDS default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
        try:
            # download=False: a reader never downloads nor prepares (a write into data_dir): that is `tfds build`'s
            self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise ValueError(f"TFDS has no dataset named {name!r}: check the name (e.g. imagenet2012)") from e
        except Exception as e:  # noqa: BLE001: TFDS says "not prepared" in many ways (AssertionError, ...)
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise ValueError(
                f"TFDS {name} split {split!r} cannot be read from {where} ({type(e).__name__}: {first[:300]}): check "
                f"the split and the data_dir, or prepare the dataset once with `tfds build {name} --file_format "
                "array_record` (see the README)") from e
        self._len = len(self._source)
        if self._len == 0:
            raise ValueError(f"TFDS {name}/{split} (data_dir={data_dir}) has no records")

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, key: int) -> dict[str, Any]:
        key = int(key)
        try:
            rec = self._source[key]
            return dict(key=key, image=np.asarray(rec["image"]), label=int(rec["label"]))
        except Exception as e:  # noqa: BLE001: a corrupt record must not end the run
            return dict(key=key, error=f"{type(e).__name__}: {e}")

    def describe(self, key: int) -> str:
        return f"tfds {self.name}/{self.split} record {int(key)}"

    def __repr__(self) -> str:
        # no data_dir: a checkpointed iterator state stays valid when the data moves
        return f"TfdsSource(name={self.name!r}, split={self.split!r}, len={self._len})"


def _scan_image_folder(root: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(class names, file paths, labels) for root/<class>/**/<image>, everything sorted."""
    from dit_jax.paths import check_input_folder

    check_input_folder(root, "image folder", hint="expected root/<class>/<image>")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {str(root)!r} has no class sub-folders (expected root/<class>/<image>)")
    files: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            found.extend(
                os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)
            )
        if not found:
            empty.append(name)
        files.extend(found)
        labels.extend([label] * len(found))
    if empty:
        raise ValueError(
            f"image folder {str(root)!r}: class folder(s) with no {'/'.join(IMAGE_EXTENSIONS)} files: "
            f"{empty[:10]}{' ...' if len(empty) > 10 else ''}"
        )
    return classes, files, np.asarray(labels, np.int32)


class ImageFolderSource:
    """root/<class_name>/**/*.{png,jpg,jpeg,webp,bmp} (extensions case-insensitive).

    Labels are the indices of the sorted class folder names, as torchvision's ImageFolder. A file that
    cannot be read becomes {"key", "error"}; one that cannot be decoded is caught by DecodeImage.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self.classes, self.files, self.labels = _scan_image_folder(self.root)
        h = hashlib.sha1()
        for f in self.files:
            h.update(os.path.relpath(f, self.root).encode("utf-8", "surrogateescape") + b"\0")
        self._listing = h.hexdigest()[:16]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: int) -> dict[str, Any]:
        key = int(key)
        try:
            with open(self.files[key], "rb") as f:
                data = f.read()
        except OSError as e:
            return dict(key=key, error=f"{type(e).__name__}: {e}")
        return dict(key=key, data=data, label=int(self.labels[key]))

    def describe(self, key: int) -> str:
        return self.files[int(key)]

    def __repr__(self) -> str:
        # the listing hash, not the root: a checkpointed iterator state stays valid when the folder moves
        return f"ImageFolderSource(classes={len(self.classes)}, files={len(self.files)}, listing={self._listing})"


@functools.lru_cache(maxsize=4)
def _digits_arrays(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.asarray(digits.images, np.float32) / np.float32(16.0)  # (1797, 8, 8), values 0..16 -> [0, 1]
    if image_size != images.shape[1]:
        # PIL "F" (float32) images: a smooth BICUBIC upsample of the [0, 1] image, then clip its overshoot
        images = np.stack(
            [np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.BICUBIC)) for im in images]
        )
    images = np.clip(images, 0.0, 1.0) * np.float32(2.0) - np.float32(1.0)
    x = np.ascontiguousarray(images[..., None], dtype=np.float32)
    y = np.asarray(digits.target, np.int32)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def load_digits_arrays(image_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (x float32 (1797, S, S, 1) in [-1, 1], y int32 (1797,) in 0..9).

    The 8x8 images (values 0..16) are scaled to [0, 1], BICUBIC-upsampled to image_size x image_size,
    clipped to [0, 1] and mapped to [-1, 1]. Returns fresh copies (the cached arrays are read-only).
    """
    if int(image_size) < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    x, y = _digits_arrays(int(image_size))
    return x.copy(), y.copy()


class DigitsSource:
    """The digits as final pipeline elements {"key", "x": float32 (S, S, C) in [-1, 1], "y", "ok"}.

    channels = 3 repeats the grey channel.
    """

    def __init__(self, image_size: int = 16, channels: int = 1):
        if channels not in (1, 3):
            raise ValueError(f"digits: channels must be 1 or 3, got {channels}")
        self.image_size, self.channels = int(image_size), int(channels)
        self._x, self._y = _digits_arrays(self.image_size)

    def __len__(self) -> int:
        return len(self._y)

    def __getitem__(self, key: int) -> dict[str, Any]:
        key = int(key)
        x = self._x[key]
        if self.channels == 3:
            x = np.repeat(x, 3, axis=-1)
        return dict(key=np.int64(key), x=np.array(x), y=np.int32(self._y[key]), ok=np.bool_(True))

    def describe(self, key: int) -> str:
        return f"digits record {int(key)}"

    def __repr__(self) -> str:
        return f"DigitsSource(image_size={self.image_size}, channels={self.channels}, len={len(self)})"
