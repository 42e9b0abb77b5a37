"""The training input pipeline: grain DataLoader per process -> fixed-size local batches, checkpointable.

    it = make_train_iterator(config.data, global_batch=256, seed=0)
    batch = next(it)                  # {"x": float32 (local_batch, H, W, C), "y": int32 (local_batch,)}
                                      # (+ "images": uint8 (local_batch, H', W', 3) with with_images=True)
    state = it.get_state()            # JSON-serialisable dict; it.set_state(state) resumes exactly
    it.stats()                        # {"bad_records": int, ...}

Order of records (the reference is DiT train.py's DistributedSampler(shuffle=True, seed) over
ImageFolder, with a new permutation every epoch):
1. the source is put in a fixed seeded order once (so that every process's shard mixes all classes:
   grain shards a source into consecutive blocks, and an image folder is sorted by class);
2. grain's IndexSampler(shuffle=True, num_epochs=None, seed) with ShardOptions(process_index,
   process_count, drop_remainder=True): each process reads its own disjoint block, reshuffled every
   epoch, forever;
3. per-record transforms (decode, ADM centre crop, flip with grain's per-record rng, [-1, 1]) and
   grain's Batch(local_batch), in `num_workers` worker processes (0: in this process).
With num_workers > 0 a worker batches its own records, so the stream depends on num_workers; it is
deterministic for (seed, process_count, num_workers), and a resume must use the same three.

Bad records (unreadable files, corrupt images) do not stop training: the transforms mark them
ok=False, and this iterator drops them, counts them (stats()["bad_records"]) and logs the first few
by name. To keep batches at local_batch, it takes the missing examples from the next grain batch; the
state is then grain's state before that batch plus how many of its good examples were already used.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import grain.python as grain
import numpy as np

from dit_jax.data.latents import DecodeLatents, LatentsSource
from dit_jax.data.sources import DigitsSource, ImageFolderSource, TfdsSource
from dit_jax.data.transforms import DecodeImage, RandomFlip, ToFloat

log = logging.getLogger("dit_jax.data")

__all__ = ["make_train_iterator", "TrainIterator", "build_source"]

STATE_FORMAT = "dit-jax-data-v1"
_MAX_NAMED_BAD = 10  # bad records named in warnings and in the state
_IDENTITY_DEFAULTS = {"images": False}  # identity fields added later: what states saved before them meant


def _get(cfg: Any, name: str, default: Any) -> Any:
    """cfg.name, or default when the field is missing (ml_collections ConfigDict, dataclass, namespace)."""
    value = getattr(cfg, name, default)
    return default if value is None else value


class _Permuted:
    """A source in a fixed seeded order (grain RandomAccessDataSource protocol)."""

    def __init__(self, source: Any, seed: int):
        self.source, self.seed = source, int(seed)
        self._order = np.random.default_rng([self.seed, 0x5EED]).permutation(len(source))

    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, index: int) -> Any:
        return self.source[int(self._order[int(index)])]

    def __repr__(self) -> str:
        return f"Permuted({self.source!r}, seed={self.seed})"


def build_source(data_cfg: Any, *, seed: int = 0, with_images: bool = False) -> tuple[Any, list, dict[str, Any]]:
    """(record source, per-record grain transforms, info) for data_cfg.source.

    info: "shape" (H, W, C) of one x, "meta" (latents metadata, else {}), "num_classes", "image_shape"
    (H', W', 3) of the "images" each element carries, or None. with_images: latent elements also carry
    their stored uint8 image (REPA's target encoder reads the clean image); latents extracted without
    images are refused. Pixel sources need nothing extra: their x is the image.
    """
    kind = _get(data_cfg, "source", "digits")
    image_size = int(_get(data_cfg, "image_size", 16 if kind == "digits" else 256))
    channels = int(_get(data_cfg, "channels", 1 if kind == "digits" else 3))
    flip = bool(_get(data_cfg, "random_flip", kind != "digits"))
    num_classes = getattr(data_cfg, "num_classes", None)
    num_classes = None if num_classes is None else int(num_classes)
    meta: dict[str, Any] = {}
    image_shape = None

    if kind == "digits":
        if num_classes is not None and num_classes != 10:
            raise ValueError(f"data.source='digits' has 10 classes but data.num_classes={num_classes}")
        source = DigitsSource(image_size, channels)
        ops: list = [RandomFlip()] if flip else []
        shape = (image_size, image_size, channels)
        num_classes = 10
    elif kind in ("tfds", "folder"):
        if kind == "tfds":
            source = TfdsSource(
                _get(data_cfg, "name", "imagenet2012"),
                _get(data_cfg, "split", "train"),
                getattr(data_cfg, "data_dir", None) or None,  # "" (the config default) = TFDS default
            )
            tfds_classes = _tfds_num_classes(source)
            if num_classes is not None and tfds_classes is not None and tfds_classes != num_classes:
                raise ValueError(f"TFDS {source.name} has {tfds_classes} classes but data.num_classes={num_classes}")
            num_classes = num_classes if num_classes is not None else tfds_classes
        else:
            path = getattr(data_cfg, "path", None)
            if not path:
                raise ValueError("data.source='folder' needs data.path (root/<class>/<images>)")
            source = ImageFolderSource(path)
            if num_classes is not None and num_classes != source.num_classes:
                raise ValueError(
                    f"image folder {str(path)!r} has {source.num_classes} class sub-folders but "
                    f"data.num_classes={num_classes}"
                )
            num_classes = source.num_classes
        ops = [DecodeImage(image_size, channels, num_classes)]
        if flip:
            ops.append(RandomFlip())
        ops.append(ToFloat())
        shape = (image_size, image_size, channels)
    elif kind == "latents":
        path = getattr(data_cfg, "path", None)
        if not path:
            raise ValueError("data.source='latents' needs data.path (an .array_record file, directory or glob)")
        source = LatentsSource(path)
        meta = dict(source.meta)
        cfg_size = getattr(data_cfg, "image_size", None)
        if cfg_size is not None and meta.get("image_size") is not None and int(meta["image_size"]) != int(cfg_size):
            raise ValueError(
                f"latents at {str(path)!r} were extracted at image_size {meta['image_size']}, "
                f"but data.image_size={cfg_size}"
            )
        if flip and not meta.get("flip"):
            log.warning(
                "data.random_flip is on but the latents at %s hold no flipped moments: no flip is applied "
                "(extract them with the flip option to get DiT's horizontal-flip augmentation)",
                path,
            )
        if with_images:
            if not source.has_images:
                raise ValueError(
                    f"REPA reads the clean images, and the latents at {str(path)!r} were extracted without them: "
                    "re-run `dit-jax extract-latents` with --store-images, or train with repa.weight=0"
                )
            image_shape = source.image_shape
        ops = [DecodeLatents(source.latent_shape, flip=flip, num_classes=num_classes, image_shape=image_shape)]
        h, w, c = source.latent_shape
        shape = (h, w, 2 * c)
    else:
        raise ValueError(f"unknown data.source {kind!r}; expected 'digits', 'tfds', 'folder' or 'latents'")
    return source, ops, dict(shape=shape, meta=meta, num_classes=num_classes, kind=kind, image_shape=image_shape)


def _tfds_num_classes(source: TfdsSource) -> int | None:
    try:
        return int(source._source.dataset_info.features["label"].num_classes)  # noqa: SLF001
    except Exception:  # noqa: BLE001: not every TFDS dataset has a ClassLabel "label"
        return None


class TrainIterator:
    """Infinite iterator of local batches {"x", "y"[, "images"]} with exact get_state/set_state and stats().

    Built by make_train_iterator; see the module docstring for the order and the handling of bad
    records. Also: `element_spec` (shapes and dtypes of a batch), `meta` (latents metadata),
    `num_records` (examples per epoch in this process's shard).
    """

    def __init__(
        self,
        loader: grain.DataLoader,
        source: Any,
        *,
        local_batch: int,
        identity: dict[str, Any],
        info: dict[str, Any],
    ):
        self._loader = loader
        self._source = source
        self._it = iter(loader)
        self.local_batch = int(local_batch)
        self._identity = identity
        self._info = info
        self.num_records = len(source) // identity["process_count"]
        # buffer: the good examples of the last grain batch, of which the first _pos are used
        self._buf: dict[str, np.ndarray] | None = None
        self._pos = 0
        self._buf_state: bytes | None = None  # grain state before the buffered batch
        self._bad = 0
        self._bad_names: list[str] = []
        self._bad_before_buf = 0
        self._names_before_buf: list[str] = []
        self._consecutive_bad = 0
        self._batches = 0
        self._fields = ("x", "y") if info.get("image_shape") is None else ("x", "y", "images")

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> TrainIterator:
        return self

    def _describe(self, key: int) -> str:
        src = self._source.source if isinstance(self._source, _Permuted) else self._source
        return src.describe(key) if hasattr(src, "describe") else f"record {key}"

    def _fetch(self) -> None:
        state = self._it.get_state()
        batch = next(self._it)
        ok = np.asarray(batch["ok"], bool)
        self._bad_before_buf = self._bad
        self._names_before_buf = list(self._bad_names)
        fields = {k: batch[k] for k in self._fields}
        if ok.all():
            self._buf = fields
            self._consecutive_bad = 0
        else:
            self._buf = {k: v[ok] for k, v in fields.items()}
            for i in np.flatnonzero(~ok):
                self._bad += 1
                if len(self._bad_names) < _MAX_NAMED_BAD:
                    name = self._describe(int(batch["key"][i]))
                    self._bad_names.append(name)
                    log.warning("skipping a record that could not be read or decoded: %s", name)
                elif self._bad in (100, 1000, 10_000, 100_000):
                    log.warning("%d records skipped so far (first: %s)", self._bad, self._bad_names)
            good = np.flatnonzero(ok)
            # bad records in a row, across batches: a source where nothing decodes must not spin forever
            self._consecutive_bad = len(ok) - 1 - good[-1] if good.size else self._consecutive_bad + len(ok)
            if self._consecutive_bad >= max(self.num_records, 1):
                raise RuntimeError(
                    f"{self._consecutive_bad} records in a row could not be decoded (a whole epoch of this "
                    f"process's shard); first bad: {self._bad_names}"
                )
        self._buf_state = state
        self._pos = 0

    def __next__(self) -> dict[str, np.ndarray]:
        need = self.local_batch
        parts: dict[str, list[np.ndarray]] = {k: [] for k in self._fields}
        while need:
            if self._buf is None or self._pos >= len(self._buf["y"]):
                self._fetch()
                continue
            take = min(need, len(self._buf["y"]) - self._pos)
            for k in self._fields:
                parts[k].append(self._buf[k][self._pos : self._pos + take])
            self._pos += take
            need -= take
        self._batches += 1
        out = {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in parts.items()}
        out["x"] = np.asarray(out["x"], np.float32)
        out["y"] = np.asarray(out["y"], np.int32)
        return out

    # ------------------------------------------------------------------ checkpointing
    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: the next batch after set_state(get_state()) is the next batch now."""
        if self._buf is not None and self._pos < len(self._buf["y"]):
            grain_state, skip = self._buf_state, self._pos
            bad, names = self._bad_before_buf, self._names_before_buf
        else:
            grain_state, skip = self._it.get_state(), 0
            bad, names = self._bad, self._bad_names
        return dict(
            format=STATE_FORMAT,
            grain=json.dumps(json.loads(grain_state), separators=(",", ":")),  # grain's DataLoader state (JSON text)
            skip=int(skip),
            bad_records=int(bad),
            bad_examples=list(names),
            batches=int(self._batches),
            **self._identity,
        )

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore a position saved by get_state (same data config, seed, process layout, num_workers)."""
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a dit-jax data iterator state (format {state.get('format')!r})")
        saved = {k: state.get(k, _IDENTITY_DEFAULTS.get(k)) for k in self._identity}
        diff = {k: (saved[k], v) for k, v in self._identity.items() if saved[k] != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"the data iterator state does not fit this pipeline ({detail})")
        self._it.set_state(state["grain"].encode())
        self._buf, self._pos, self._buf_state = None, 0, None
        self._bad = int(state["bad_records"])
        self._bad_names = list(state.get("bad_examples", []))
        self._consecutive_bad = 0
        self._batches = int(state.get("batches", 0))
        skip = int(state.get("skip", 0))
        if skip:
            self._fetch()
            if skip > len(self._buf["y"]):
                raise ValueError(f"data state skips {skip} examples of a batch that has {len(self._buf['y'])}")
            self._pos = skip

    def close(self) -> None:
        """Stop grain's worker processes (if any); the iterator is unusable afterwards."""
        inner = getattr(self._it, "_iterator", None)
        if hasattr(inner, "close"):
            inner.close()

    def __enter__(self) -> TrainIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ info
    def stats(self) -> dict[str, Any]:
        return dict(
            bad_records=int(self._bad),
            bad_examples=list(self._bad_names),
            batches=int(self._batches),
            epoch=self._batches * self.local_batch / max(self.num_records, 1),
        )

    @property
    def element_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        spec = {
            "x": ((self.local_batch, *self._info["shape"]), np.dtype(np.float32)),
            "y": ((self.local_batch,), np.dtype(np.int32)),
        }
        if self._info.get("image_shape") is not None:
            spec["images"] = ((self.local_batch, *self._info["image_shape"]), np.dtype(np.uint8))
        return spec

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self._info["meta"])

    @property
    def num_classes(self) -> int | None:
        return self._info["num_classes"]

    def __repr__(self) -> str:
        return f"TrainIterator({self._source!r}, local_batch={self.local_batch}, {self._identity})"


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside absl.app (our CLI is argparse) take their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_train_iterator(
    data_cfg: Any,
    *,
    global_batch: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    with_images: bool = False,
) -> TrainIterator:
    """An infinite, checkpointable iterator of this process's batches (see the module docstring).

    data_cfg fields (attribute access; missing ones take defaults): source ("digits" | "tfds" |
    "folder" | "latents"), name ("imagenet2012"), split ("train"), data_dir (None), path, image_size,
    channels, random_flip, num_workers (0), num_classes, worker_buffer_size (2).
    next(it) -> {"x": float32 (global_batch // process_count, H, W, C), "y": int32}; x in [-1, 1] for
    images, [mean | logvar] on the channel axis for latents. with_images (latents only): batches also carry
    "images", uint8 (local_batch, H', W', 3), the stored images (see build_source).
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    process_index, process_count = int(process_index), int(process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    global_batch = int(global_batch)
    if global_batch <= 0 or global_batch % process_count:
        raise ValueError(f"global_batch {global_batch} is not a positive multiple of process_count {process_count}")
    local_batch = global_batch // process_count
    seed = int(seed) % (2**32)  # grain's sampler takes a non-negative 32-bit seed
    num_workers = int(_get(data_cfg, "num_workers", 0))

    if num_workers > 0:
        _absl_flags_parsed()
    source, ops, info = build_source(data_cfg, seed=seed, with_images=with_images)
    if len(source) // process_count == 0:
        raise ValueError(f"{source!r} has {len(source)} records, fewer than process_count={process_count}")
    source = _Permuted(source, seed)
    shard = grain.ShardOptions(shard_index=process_index, shard_count=process_count, drop_remainder=True)
    sampler = grain.IndexSampler(
        num_records=len(source), shard_options=shard, shuffle=True, num_epochs=None, seed=seed
    )
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[*ops, grain.Batch(batch_size=local_batch, drop_remainder=True)],
        worker_count=num_workers,
        worker_buffer_size=int(_get(data_cfg, "worker_buffer_size", 2)),
        shard_options=shard,
        # grain reads records in threads ahead of use; its default buffer of 500 costs O(buffer) per record
        # (grain 0.2.18 polls every ready future), about 1 ms a record, so keep it small; in-memory digits
        # need no read threads at all
        read_options=grain.ReadOptions(
            num_threads=int(_get(data_cfg, "read_threads", 0 if info["kind"] == "digits" else 16)),
            prefetch_buffer_size=int(_get(data_cfg, "read_buffer", 0 if info["kind"] == "digits" else 64)),
        ),
    )
    identity = dict(
        source=repr(source),
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        local_batch=local_batch,
        num_workers=num_workers,
        images=info["image_shape"] is not None,
    )
    log.info(
        "data: %r, %d records per process per epoch, local batch %d, %d workers",
        source, len(source) // process_count, local_batch, num_workers,
    )
    return TrainIterator(loader, source, local_batch=local_batch, identity=identity, info=info)
