"""Pre-extracted VAE latents in ArrayRecord files: writer, metadata sidecar, grain source and decoder.

DiT's train.py encodes every batch with the VAE on the fly and trains on
    z = 0.18215 * posterior.sample() = 0.18215 * (mean + exp(logvar / 2) * eps)
so every epoch sees a fresh posterior sample. Caching one sample per image (as fast-DiT does) would
change that augmentation, so we store the posterior *moments* and the trainer draws eps each step:
the training element is x = concat([mean, logvar], channel axis), shape (h, w, 2C).

File format (one `.array_record` file per writer call, written with `group_size:1` so that grain's
random access reads one record at a time):
- every record is a msgpack map (flax.serialization.msgpack_serialize; arrays are msgpack extension
  values holding dtype, shape and raw bytes, restored with np.frombuffer: nothing is unpickled, and
  decoding takes ~10 us, where an np.savez record took ~0.6 ms) holding
    "mean", "logvar": (h, w, C) arrays in the stored dtype (float32 by default: the SD VAE's
                      posterior std is small (~1e-2 of the mean), comparable to float16's rounding of
                      the mean, so float16 storage is an explicit opt-in, dtype="float16"),
    "label":          int,
    optionally "mean_flip", "logvar_flip": the moments of the horizontally flipped image,
    optionally "image": uint8 (H, W, 3), the centre-cropped image the moments encode (for REPA, whose
                      target encoder reads the clean image; `extract-latents --store-images`).
- a JSON sidecar `<path>.json` with the metadata: format, count, latent_shape [h, w, C], dtype, flip
  (whether every record has the flipped moments), images (whether every record has its image),
  image_shape [H, W, 3] when it does, scale (0.18215 unless given), and whatever the caller passes (vae
  name, image_size, ...). Both files are written atomically (temp, then rename).

Storage: an fp32 record at 256 px with flip is 64 KiB; its image adds 192 KiB (ImageNet's 1.28M train
images: ~84 GB of moments, ~250 GB more with images).

Horizontal flip: a latent cannot be flipped after encoding (the VAE is not equivariant to mirroring),
so `dit-jax extract-latents` can encode both orientations and store the flipped one's moments in the
same record. At training time, with random_flip on, DecodeLatents picks one orientation per record
with probability 0.5 (grain's per-record rng); records without flip moments always give the original.
A stored image is mirrored together with the moments, so REPA's target always sees the image the
latent encodes.
"""

from __future__ import annotations

import errno
import glob as _glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grain.python as grain
import numpy as np
from flax import serialization

from dit_jax.constants import SD_VAE_SCALE
from dit_jax.paths import atomic_path, write_text_atomic

log = logging.getLogger("dit_jax.data")

__all__ = [
    "LATENT_SCALE",
    "FORMAT",
    "write_latents",
    "read_latents_meta",
    "encode_latent_record",
    "decode_latent_record",
    "resolve_latent_paths",
    "LatentsSource",
    "DecodeLatents",
]

LATENT_SCALE = SD_VAE_SCALE  # the default scale of latents written here (DiT train.py / sample.py)
FORMAT = "dit-jax-latents-v1"
_FLIP_KEYS = ("mean_flip", "logvar_flip")


def encode_latent_record(
    mean: np.ndarray,
    logvar: np.ndarray,
    label: int,
    mean_flip: np.ndarray | None = None,
    logvar_flip: np.ndarray | None = None,
    *,
    image: np.ndarray | None = None,
    dtype: str | np.dtype = "float32",
) -> bytes:
    """One record's bytes: msgpack of {mean, logvar, label[, mean_flip, logvar_flip][, image]}.

    image: uint8 (H, W, 3), the (unflipped) image the moments encode."""
    dtype = np.dtype(dtype)
    arrays: dict[str, Any] = dict(mean=np.asarray(mean, dtype), logvar=np.asarray(logvar, dtype), label=int(label))
    if arrays["mean"].shape != arrays["logvar"].shape or arrays["mean"].ndim != 3:
        raise ValueError(f"mean {arrays['mean'].shape} and logvar {arrays['logvar'].shape} must be equal (h, w, C)")
    if (mean_flip is None) != (logvar_flip is None):
        raise ValueError("give both mean_flip and logvar_flip, or neither")
    if mean_flip is not None:
        arrays["mean_flip"] = np.asarray(mean_flip, dtype)
        arrays["logvar_flip"] = np.asarray(logvar_flip, dtype)
        for k in _FLIP_KEYS:
            if arrays[k].shape != arrays["mean"].shape:
                raise ValueError(f"{k} has shape {arrays[k].shape}, mean has {arrays['mean'].shape}")
    if image is not None:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"a stored image is uint8 (H, W, 3), got {image.dtype} {image.shape}")
        arrays["image"] = np.ascontiguousarray(image)
    return serialization.msgpack_serialize(arrays)


def decode_latent_record(data: bytes) -> dict[str, np.ndarray]:
    """Record bytes -> {"mean", "logvar", "label"[, "mean_flip", "logvar_flip"][, "image"]} (read-only arrays)."""
    rec = serialization.msgpack_restore(data)
    if not isinstance(rec, dict) or not {"mean", "logvar", "label"} <= rec.keys():
        raise ValueError("not a latent record (expected a map with mean, logvar and label)")
    return rec


def _as_record_tuple(rec: Any) -> tuple:
    """-> (mean, logvar, label, mean_flip, logvar_flip, image), absent parts None."""
    if isinstance(rec, Mapping):
        return (rec["mean"], rec["logvar"], rec["label"], rec.get("mean_flip"), rec.get("logvar_flip"),
                rec.get("image"))
    rec = tuple(rec)
    if len(rec) == 3:
        return (*rec, None, None, None)
    if len(rec) == 5:
        return (*rec, None)
    raise ValueError(
        "a latent record is (mean, logvar, label) or (mean, logvar, label, mean_flip, logvar_flip), "
        f"or a dict with those keys (and optionally image); got a tuple of {len(rec)}"
    )


_STRERRORS = {os.strerror(code): code for code in sorted(errno.errorcode, reverse=True)}


def _writer_os_error(e: RuntimeError, path: Path) -> OSError | None:
    """The OSError behind an ArrayRecordWriter RuntimeError ("write() failed: No space left on device; ..."),
    naming `path`, so that a full disk or a permission problem reads as one; None for any other RuntimeError."""
    m = re.search(r"\w+\(\) failed: ([^;]+);", str(e))
    if m is None:
        return None
    code = _STRERRORS.get(m.group(1).strip(), errno.EIO)
    return OSError(code, os.strerror(code), str(path))


def _write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", fsync=True)


def write_latents(
    path: str | os.PathLike,
    records: Iterable[Any],
    *,
    meta: Mapping[str, Any],
    dtype: str | np.dtype = "float32",
) -> dict[str, Any]:
    """Write latent records to one ArrayRecord file `path` plus the JSON sidecar `<path>.json`.

    records: (mean (h, w, C), logvar (h, w, C), label) tuples, or 5-tuples adding (mean_flip,
    logvar_flip), or dicts with those keys and optionally "image" (uint8 (H, W, 3)); every record must
    have the same shapes, and either all or none must have the flip moments (and the image). meta:
    caller's metadata (e.g. vae, image_size; scale defaults to 0.18215); count, latent_shape, dtype,
    flip, images, image_shape and format are filled in here. Returns the meta written.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype("float32"), np.dtype("float16")):
        raise ValueError(f"latents are stored as float32 or float16, not {dtype}")
    count, shape, flip, image_shape = 0, None, None, None
    try:
        with atomic_path(path) as tmp:  # renamed over `path` once all is written; removed if anything fails
            writer = ArrayRecordWriter(str(tmp), "group_size:1")
            try:
                for rec in records:
                    mean, logvar, label, mean_flip, logvar_flip, image = _as_record_tuple(rec)
                    has_flip = mean_flip is not None
                    this_image = None if image is None else tuple(np.shape(image))
                    if flip is None:
                        flip, shape, image_shape = has_flip, tuple(np.shape(mean)), this_image
                    if has_flip != flip:
                        raise ValueError(f"record {count}: either every record has the flip moments or none does")
                    if tuple(np.shape(mean)) != shape:
                        raise ValueError(f"record {count} has latent shape {np.shape(mean)}, the first had {shape}")
                    if this_image != image_shape:
                        raise ValueError(f"record {count} has image shape {this_image}, the first had {image_shape} "
                                         "(every record stores its image, or none does)")
                    writer.write(encode_latent_record(mean, logvar, label, mean_flip, logvar_flip, image=image,
                                                      dtype=dtype))
                    count += 1
                writer.close()
            except BaseException:
                try:
                    writer.close()
                except Exception:  # noqa: BLE001
                    pass
                raise
            if count == 0:
                raise ValueError(f"write_latents({str(path)!r}): no records")
    except RuntimeError as e:  # from ArrayRecordWriter: a full disk or a permission problem reads as one
        if (os_error := _writer_os_error(e, path)) is None:
            raise
        raise os_error from e
    full = dict(meta)
    full.setdefault("scale", LATENT_SCALE)
    full.update(format=FORMAT, count=count, latent_shape=list(shape), dtype=dtype.name, flip=bool(flip),
                images=image_shape is not None)
    if image_shape is not None:
        full["image_shape"] = list(image_shape)
    _write_json_atomic(Path(f"{path}.json"), full)
    return full


def _is_remote(path: str) -> bool:
    return "://" in path


def read_latents_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata sidecar `<path>.json` of one latents file (local, or gs:// etc. through etils.epath)."""
    side = f"{path}.json"
    try:
        if _is_remote(side):
            from etils import epath

            text = epath.Path(side).read_text()
        else:
            with open(side) as f:
                text = f.read()
    except FileNotFoundError:
        msg = f"latents metadata {side!r} not found (write_latents writes it beside the file)"
        raise FileNotFoundError(msg) from None
    meta = json.loads(text)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{side!r}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def resolve_latent_paths(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """A file, a directory (its *.array_record files), a glob, or a list of those -> sorted file list."""
    if isinstance(path, (list, tuple)):
        out: list[str] = []
        for p in path:
            out.extend(resolve_latent_paths(p))
        return out
    p = str(path)
    if _is_remote(p):
        from etils import epath

        ep = epath.Path(p)
        if any(c in p for c in "*?["):
            files = sorted(str(f) for f in epath.Path(os.path.dirname(p)).glob(os.path.basename(p)))
        elif ep.is_dir():
            files = sorted(str(f) for f in ep.glob("*.array_record"))
        else:
            files = [p] if ep.exists() else []
        files = [f for f in files if not f.endswith(".json")]
    elif os.path.isdir(p):
        files = sorted(_glob.glob(os.path.join(p, "*.array_record")))
    elif any(c in p for c in "*?["):
        files = sorted(f for f in _glob.glob(p) if not f.endswith(".json"))
    else:
        files = [p] if os.path.isfile(p) else []
    if not files:
        raise FileNotFoundError(f"no latent ArrayRecord files at {p!r}")
    return files


class LatentsSource:
    """A grain random-access source over one or several latent ArrayRecord files.

    Records are {"key", "data": record bytes}; DecodeLatents turns them into training elements. The
    sidecars must agree on latent_shape, dtype, flip, scale and images, and their counts must match the
    files. `has_images`: every record stores its uint8 image (of `image_shape`).
    """

    def __init__(self, path: str | os.PathLike | Sequence[str | os.PathLike]):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.paths = resolve_latent_paths(path)
        metas = [read_latents_meta(p) for p in self.paths]
        first = metas[0]
        for p, m in zip(self.paths[1:], metas[1:]):
            for k in ("latent_shape", "dtype", "flip", "scale", "images", "image_shape"):
                if m.get(k) != first.get(k):
                    raise ValueError(
                        f"latent files disagree on {k}: {self.paths[0]} has {first.get(k)!r}, {p} has {m.get(k)!r}"
                    )
        try:
            self._source = ArrayRecordDataSource(self.paths)
        except RuntimeError as e:
            hint = (
                " (the pip array_record reader opens local files only: copy the latents to local disk or "
                "mount the bucket, e.g. with gcsfuse)" if any(_is_remote(p) for p in self.paths) else ""
            )
            raise RuntimeError(f"cannot open the latent files {self.paths[:3]}...: {e}{hint}") from e
        self._counts = [int(m["count"]) for m in metas]
        if sum(self._counts) != len(self._source):
            raise ValueError(
                f"latent files hold {len(self._source)} records but their sidecars say {sum(self._counts)} "
                f"(truncated or replaced file?): {self.paths}"
            )
        self._starts = np.cumsum([0] + self._counts)
        self.meta = dict(first, count=sum(self._counts), files=len(self.paths))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["latent_shape"])

    @property
    def has_images(self) -> bool:
        return bool(self.meta.get("images", False))  # files written before images existed have no key

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        return tuple(self.meta["image_shape"]) if self.has_images else None

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, key: int) -> dict[str, Any]:
        key = int(key)
        try:
            return dict(key=key, data=self._source[key])
        except Exception as e:  # noqa: BLE001
            return dict(key=key, error=f"{type(e).__name__}: {e}")

    def describe(self, key: int) -> str:
        i = int(np.searchsorted(self._starts, int(key), side="right")) - 1
        return f"{self.paths[i]} record {int(key) - int(self._starts[i])}"

    def __repr__(self) -> str:
        # file names and counts, not full paths: a checkpointed iterator state stays valid when the data moves
        names = [[os.path.basename(p), n] for p, n in zip(self.paths, self._counts)]
        listing = hashlib.sha1(json.dumps(names).encode())
        return (
            f"LatentsSource(files={len(self.paths)}, count={len(self)}, latent_shape={list(self.latent_shape)}, "
            f"listing={listing.hexdigest()[:16]})"
        )


class DecodeLatents(grain.RandomMapTransform):
    """{"key", "data"} -> {"key", "x": float32 (h, w, 2C) = [mean | logvar], "y", "ok"[, "images"]}.

    With flip=True and a record holding the flipped image's moments, picks that orientation with
    probability 0.5 (grain's per-record rng: deterministic for a seed). With image_shape given, also
    returns the record's stored image as "images", uint8 (H, W, 3), mirrored when the flipped moments
    were picked. Undecodable records, records of the wrong shape or without an image when one is asked
    for give ok=False (dropped and counted by the iterator).
    """

    def __init__(
        self,
        latent_shape: Sequence[int],
        flip: bool = False,
        num_classes: int | None = None,
        image_shape: Sequence[int] | None = None,
    ):
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.flip = bool(flip)
        self.num_classes = num_classes
        self.image_shape = None if image_shape is None else tuple(int(s) for s in image_shape)

    def _bad(self, key: int) -> dict[str, Any]:
        h, w, c = self.latent_shape
        out = dict(key=np.int64(key), x=np.zeros((h, w, 2 * c), np.float32), y=np.int32(0), ok=np.bool_(False))
        if self.image_shape is not None:
            out["images"] = np.zeros(self.image_shape, np.uint8)
        return out

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        key = int(element["key"])
        if element.get("error"):
            return self._bad(key)
        try:
            rec = decode_latent_record(element["data"])
            mean, logvar, label = rec["mean"], rec["logvar"], int(rec["label"])
            flipped = self.flip and "mean_flip" in rec and rng.random() < 0.5
            if flipped:
                mean, logvar = rec["mean_flip"], rec["logvar_flip"]
            if mean.shape != self.latent_shape or logvar.shape != self.latent_shape:
                raise ValueError(f"shape {mean.shape}/{logvar.shape}, expected {self.latent_shape}")
            image = None
            if self.image_shape is not None:
                image = rec["image"]  # KeyError: a record without its image is a bad record
                if image.shape != self.image_shape or image.dtype != np.uint8:
                    raise ValueError(f"image {image.dtype} {image.shape}, expected uint8 {self.image_shape}")
                image = np.ascontiguousarray(image[:, ::-1]) if flipped else image
        except Exception as e:  # noqa: BLE001: a corrupt record is skipped and counted
            log.debug("latent record %d failed to decode: %s", key, e)
            return self._bad(key)
        if self.num_classes is not None and not 0 <= label < self.num_classes:
            raise ValueError(f"latent record {key} has label {label}, outside [0, {self.num_classes})")
        x = np.concatenate([mean, logvar], axis=-1).astype(np.float32)
        out = dict(key=np.int64(key), x=x, y=np.int32(label), ok=np.bool_(True))
        if image is not None:
            out["images"] = image
        return out
