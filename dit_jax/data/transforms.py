"""Per-record transforms: the ADM centre crop, decoding, horizontal flip, [-1, 1] scaling.

The reference is the official DiT train.py (facebookresearch/DiT):

    transform = Compose([Lambda(lambda img: center_crop_arr(img, image_size)),   # ADM centre crop
                         RandomHorizontalFlip(),                                   # p = 0.5
                         ToTensor(),                                               # x / 255
                         Normalize(mean=[0.5] * 3, std=[0.5] * 3)])                # (x - 0.5) / 0.5

with images loaded by torchvision's ImageFolder (PIL, `.convert("RGB")`). ToTensor + Normalize is
x / 127.5 - 1. We keep the layout NHWC (the official code is NCHW).

Every element that flows through the grain pipeline is a dict
    {"key": int64 record key, "x": array (H, W, C), "y": int32 label, "ok": bool}
where `ok=False` marks a record that could not be decoded: it keeps a zero image of the right shape so
that grain can batch it, and the iterator in pipeline.py drops and counts it (stats()["bad_records"]).
"""

from __future__ import annotations

import io
import logging
from typing import Any

import grain.python as grain
import numpy as np
from PIL import Image

log = logging.getLogger("dit_jax.data")

__all__ = [
    "center_crop_arr",
    "to_model_range",
    "DecodeImage",
    "RandomFlip",
    "ToFloat",
    "bad_element",
]


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """The ADM centre crop: PIL image -> uint8 (image_size, image_size[, C]) array.

    Same algorithm as `center_crop_arr` in guided-diffusion's image_datasets.py (commit 8fb3ad9, L126),
    which DiT's train.py copies: halve the image with a BOX filter while its short side is still >=
    2 * image_size, then BICUBIC-resize so the short side is image_size (the other side rounded), then
    take the centre image_size x image_size window ((extra) // 2 pixels off the top / left).
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def to_model_range(x: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1]: x / 127.5 - 1 (= ToTensor then Normalize(0.5, 0.5))."""
    return np.asarray(x, np.float32) / np.float32(127.5) - np.float32(1.0)


def _pil_mode(channels: int) -> str:
    if channels == 3:
        return "RGB"
    if channels == 1:
        return "L"
    raise ValueError(f"channels must be 1 or 3 for image sources, got {channels}")


def _array_to_pil(image: np.ndarray) -> Image.Image:
    """uint8 HWC / HW array -> PIL image (grey, grey+alpha, RGB or RGBA)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (2, 3, 4)):
        return Image.fromarray(image)  # mode inferred: L, LA, RGB, RGBA
    raise ValueError(f"cannot interpret an image of shape {image.shape}")


def bad_element(key: int, image_size: int, channels: int, dtype=np.uint8) -> dict[str, Any]:
    """The placeholder for a record that failed to decode (dropped and counted by the iterator)."""
    return dict(
        key=np.int64(key),
        x=np.zeros((image_size, image_size, channels), dtype),
        y=np.int32(0),
        ok=np.bool_(False),
    )


class DecodeImage(grain.MapTransform):
    """Source record -> {"key", "x": uint8 (S, S, C) ADM centre crop, "y", "ok"}.

    Accepts records from the sources in sources.py: {"key", "label", "data": encoded bytes} (image
    folder) or {"key", "label", "image": uint8 array} (TFDS), or {"key", "error": str} for a record
    the source could not read. Images are converted to RGB (grey -> repeated, alpha dropped, as PIL's
    convert("RGB") does in torchvision's loader) before the crop, or to "L" when channels == 1.
    A file that PIL cannot decode (corrupt, truncated) gives a bad element instead of an exception.
    """

    def __init__(self, image_size: int, channels: int = 3, num_classes: int | None = None):
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.mode = _pil_mode(self.channels)
        self.num_classes = num_classes

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        key = int(element["key"])
        if element.get("error"):
            return bad_element(key, self.image_size, self.channels)
        label = int(element["label"])
        if self.num_classes is not None and not 0 <= label < self.num_classes:
            raise ValueError(f"record {key} has label {label}, outside [0, {self.num_classes})")
        try:
            if "data" in element:
                with Image.open(io.BytesIO(element["data"])) as pil:
                    pil.load()  # truncated files raise here (LOAD_TRUNCATED_IMAGES stays False)
                    pil = pil.convert(self.mode)
            else:
                pil = _array_to_pil(element["image"]).convert(self.mode)
            arr = center_crop_arr(pil, self.image_size)
        except Exception as e:  # noqa: BLE001: any decode failure is a bad record, not a crash
            log.debug("record %d failed to decode: %s", key, e)
            return bad_element(key, self.image_size, self.channels)
        if arr.ndim == 2:
            arr = arr[..., None]
        return dict(key=np.int64(key), x=np.ascontiguousarray(arr), y=np.int32(label), ok=np.bool_(True))


class RandomFlip(grain.RandomMapTransform):
    """Horizontal flip of "x" (H, W, C) with probability p (torchvision RandomHorizontalFlip, p = 0.5).

    The rng is grain's per-record generator (seeded from the sampler seed and the record's position in
    the stream), so the flip is deterministic for a seed and differs between epochs.
    """

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if rng.random() < self.p:
            element = dict(element, x=np.ascontiguousarray(element["x"][:, ::-1]))
        return element


class ToFloat(grain.MapTransform):
    """uint8 "x" -> float32 in [-1, 1] (x / 127.5 - 1)."""

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        return dict(element, x=to_model_range(element["x"]))
