"""The training input pipeline: one global order of examples, each process reading its rows of every batch.

    it = make_train_iterator(config.data, global_batch=256, seed=0, rows=local_rows)
    batch = next(it)                  # {"x": float32 (len(rows), H, W, C), "y": int32 (len(rows),)}
                                      # (+ "images": uint8 (len(rows), H', W', 3) with with_images=True)
    state = it.get_state()            # JSON-serialisable dict; it.set_state(state) resumes exactly
    it.stats()                        # {"bad_records": int, ...}

The data a run sees depends only on (data, seed, global batch), never on the number of processes, devices
or grain workers, so a run resumes exactly on another topology (a pod preempted on 64 chips continues on 32):
1. Global order (the reference is DiT train.py's DistributedSampler(shuffle=True, seed), a new
   permutation every epoch): position q of the endless stream is record perm_e[q % N] of epoch
   e = q // N, with perm_e a permutation of the N records seeded by (seed, e). Global batch s is
   positions s*G .. s*G + G - 1.
2. Rows: a process reads only the positions of the rows its devices hold (`rows`, from the batch
   sharding: `train.sharding.local_rows`); by default process p of P reads the block p*G/P .. (p+1)*G/P - 1.
3. Per-record transforms (decode, ADM centre crop, flip, [-1, 1]) run in grain, in `num_workers`
   worker processes (0: in this process), with a random generator seeded by (seed, q): the flip of an
   example does not depend on who reads it. grain batches each process's rows (in its workers too:
   `_RowsSampler` lays the indices out so that every grain batch is one global batch's rows).
The state is the number of global batches consumed (plus the identity: source, seed, global batch), the
same on every process: a checkpoint stores it once.

Bad records (unreadable files, corrupt images) do not stop training: the transforms mark them ok=False,
and the iterator puts another record in their place: the next key (k + 1, k + 2, ... mod N) that decodes,
with the flip drawn for that position. The substitute depends only on the record, so it too is the same
on every topology. They are counted (stats()["bad_records"], this process's rows only) and the first few
named in warnings.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Sequence

import grain.python as grain
import numpy as np

from dit_jax.data.latents import DecodeLatents, LatentsSource
from dit_jax.data.sources import DigitsSource, ImageFolderSource, TfdsSource
from dit_jax.data.transforms import DecodeImage, RandomFlip, ToFloat

log = logging.getLogger("dit_jax.data")

__all__ = ["make_train_iterator", "TrainIterator", "build_source", "GlobalOrder"]

STATE_FORMAT = "dit-jax-data-v2"
_OLD_FORMAT = "dit-jax-data-v1"  # per-process order (before the global order): resumed at its batch count
_MAX_NAMED_BAD = 10  # bad records named in warnings and in the state
_STREAM_LENGTH = 2**48  # positions of the endless stream grain indexes (its samplers need a length)
_IDENTITY_DEFAULTS = {"images": False}  # identity fields added later: what states saved before them meant
# grain's reading: batches each worker process keeps ready, and the threads and buffer that read records ahead of
# use. Its default buffer of 500 costs O(buffer) per record (grain 0.2.18 polls every ready future), about 1 ms a
# record, so keep it small; the in-memory digits need no read threads at all
WORKER_BUFFER_SIZE = 2
READ_THREADS, READ_BUFFER = 16, 64


class GlobalOrder:
    """Position q of the endless stream -> record key: epoch q // N in the permutation seeded by (seed, epoch)."""

    def __init__(self, num_records: int, seed: int):
        self.num_records, self.seed = int(num_records), int(seed)
        self._perms: dict[int, np.ndarray] = {}

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, 0x5EED, int(epoch)]).permutation(self.num_records)
            if len(self._perms) >= 2:  # readers move forward: keep the current epoch and the next
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def key(self, q: int) -> int:
        epoch, r = divmod(int(q), self.num_records)
        return int(self.epoch_permutation(epoch)[r])

    def __getstate__(self) -> dict:  # grain pickles the sampler into its workers: leave the cache behind
        return dict(num_records=self.num_records, seed=self.seed)

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["num_records"], state["seed"])


def position_rng(seed: int, q: int, attempt: int = 0) -> np.random.Generator:
    """The random generator of stream position q (attempt > 0: for the substitute of a bad record)."""
    return np.random.default_rng([int(seed), int(q), int(attempt)])


class _RowsSampler:
    """grain sampler over this process's records, laid out so that grain's batches are global batches' rows.

    grain's worker w of W reads sampler indices w, w + W, w + 2W, ... and batches L of them; batches come out
    round robin (worker 0's first, worker 1's first, ...). So index i = w + W * (k * L + m) is row m of output
    batch b = k * W + w, which holds stream positions q = (start + b) * G + rows[m]: the batches, their rows and
    each record's random generator are the same for every W (W = 1 without workers).
    """

    def __init__(self, order: GlobalOrder, global_batch: int, rows: np.ndarray, start_batch: int, workers: int):
        self.order, self.global_batch, self.rows = order, int(global_batch), rows
        self.start, self.workers = int(start_batch), max(int(workers), 1)

    def __len__(self) -> int:
        return _STREAM_LENGTH

    def position(self, i: int) -> int:
        r, w = divmod(int(i), self.workers)
        k, m = divmod(r, len(self.rows))
        return (self.start + k * self.workers + w) * self.global_batch + int(self.rows[m])

    def __getitem__(self, i: int) -> grain.RecordMetadata:
        if not 0 <= i < _STREAM_LENGTH:
            raise IndexError(i)
        q = self.position(i)
        return grain.RecordMetadata(index=q, record_key=self.order.key(q), rng=position_rng(self.order.seed, q))


def build_source(data_cfg: Any, *, seed: int = 0, with_images: bool = False) -> tuple[Any, list, dict[str, Any]]:
    """(record source, per-record grain transforms, info) for data_cfg.source.

    info: "shape" (H, W, C) of one x, "meta" (latents metadata, else {}), "num_classes", "image_shape"
    (H', W', 3) of the "images" each element carries, or None. with_images: latent elements also carry
    their stored uint8 image (REPA's target encoder reads the clean image); latents extracted without
    images are refused. Pixel sources need nothing extra: their x is the image.
    """
    kind = data_cfg.source
    image_size, channels = int(data_cfg.image_size), int(data_cfg.channels)
    flip = bool(data_cfg.random_flip)
    num_classes = int(data_cfg.num_classes)
    meta: dict[str, Any] = {}
    image_shape = None

    if kind == "digits":
        if num_classes != 10:
            raise ValueError(f"data.source='digits' has 10 classes but data.num_classes={num_classes}")
        source = DigitsSource(image_size, channels)
        ops: list = [RandomFlip()] if flip else []
        shape = (image_size, image_size, channels)
        num_classes = 10
    elif kind in ("tfds", "folder"):
        if kind == "tfds":
            source = TfdsSource(
                data_cfg.name,
                data_cfg.split,
                data_cfg.data_dir or None,  # "" (the config default) = TFDS default
            )
            tfds_classes = _tfds_num_classes(source)
            if tfds_classes is not None and tfds_classes != num_classes:
                raise ValueError(f"TFDS {source.name} has {tfds_classes} classes but data.num_classes={num_classes}")
        else:
            path = data_cfg.path
            if not path:
                raise ValueError("data.source='folder' needs data.path (root/<class>/<images>)")
            source = ImageFolderSource(path)
            if num_classes != source.num_classes:
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
        path = data_cfg.path
        if not path:
            raise ValueError("data.source='latents' needs data.path (an .array_record file, directory or glob)")
        source = LatentsSource(path)
        meta = dict(source.meta)
        if meta.get("image_size") is not None and int(meta["image_size"]) != image_size:
            raise ValueError(
                f"latents at {str(path)!r} were extracted at image_size {meta['image_size']}, "
                f"but data.image_size={image_size}"
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
    """Endless iterator of this process's rows of every global batch, {"x", "y"[, "images"]}, with exact
    get_state/set_state (the same state on every process) and stats().

    Built by make_train_iterator; see the module docstring for the order and the handling of bad records.
    Also: `element_spec` (shapes and dtypes of a batch), `meta` (latents metadata), `num_records` (records
    in one epoch of the whole source).
    """

    def __init__(
        self,
        source: Any,
        ops: list,
        *,
        order: GlobalOrder,
        global_batch: int,
        rows: np.ndarray,
        identity: dict[str, Any],
        info: dict[str, Any],
        num_workers: int,
        worker_buffer_size: int,
        read_options: grain.ReadOptions,
    ):
        self._source = source
        self._ops = ops
        self._order = order
        self.global_batch = int(global_batch)
        self.rows = rows
        self.local_batch = len(rows)
        self._identity = identity
        self._info = info
        self._loader_kwargs = dict(worker_count=num_workers, worker_buffer_size=worker_buffer_size,
                                   read_options=read_options)
        self.num_records = len(source)
        self._fields = ("x", "y") if info.get("image_shape") is None else ("x", "y", "images")
        self._bad = 0
        self._bad_names: list[str] = []
        self._bad_keys: set[int] = set()  # keys known not to decode (skipped without decoding again)
        self._it: Any = None
        self._position = 0
        self._start(0)

    def _start(self, batch: int) -> None:
        """(Re)start grain at global batch `batch`."""
        self.close()
        sampler = _RowsSampler(self._order, self.global_batch, self.rows, batch, self._loader_kwargs["worker_count"])
        loader = grain.DataLoader(
            data_source=self._source,
            sampler=sampler,
            operations=[*self._ops, grain.Batch(batch_size=self.local_batch, drop_remainder=True)],
            shard_options=grain.ShardOptions(shard_index=0, shard_count=1),  # the sampler picks this process's rows
            **self._loader_kwargs,
        )
        self._it = iter(loader)
        self._position = int(batch)

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> TrainIterator:
        return self

    def _describe(self, key: int) -> str:
        return self._source.describe(key) if hasattr(self._source, "describe") else f"record {key}"

    def _note_bad(self, key: int) -> None:
        self._bad += 1
        if key in self._bad_keys:
            return
        self._bad_keys.add(key)
        if len(self._bad_names) < _MAX_NAMED_BAD:
            name = self._describe(key)
            self._bad_names.append(name)
            log.warning("a record could not be read or decoded, another takes its place: %s", name)
        elif self._bad in (100, 1000, 10_000, 100_000):
            log.warning("%d records replaced so far (first: %s)", self._bad, self._bad_names)

    def _transform(self, key: int, rng: np.random.Generator) -> dict[str, Any]:
        """The pipeline's transforms on one record, in this process (for substitutes of bad records)."""
        element = self._source[key]
        for op in self._ops:
            element = op.random_map(element, rng) if isinstance(op, grain.RandomMapTransform) else op.map(element)
        return element

    def _substitute(self, q: int, key: int) -> dict[str, Any]:
        """The record that takes bad position q's place: the next key after `key` (cyclically) that decodes."""
        self._note_bad(key)
        n = self.num_records
        for attempt in range(1, n):
            k = (key + attempt) % n
            if k in self._bad_keys:
                continue
            element = self._transform(k, position_rng(self._order.seed, q, attempt))
            if bool(element["ok"]):
                return element
            self._note_bad(k)
        raise RuntimeError(f"no record of {self._source!r} could be decoded; first bad: {self._bad_names}")

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        out = {k: batch[k] for k in self._fields}
        bad = np.flatnonzero(~np.asarray(batch["ok"], bool))
        if bad.size:
            out = {k: np.array(v) for k, v in out.items()}  # writable copies
            base = self._position * self.global_batch
            for m in bad:
                element = self._substitute(base + int(self.rows[m]), int(batch["key"][m]))
                for k in self._fields:
                    out[k][m] = element[k]
        self._position += 1
        out["x"] = np.asarray(out["x"], np.float32)
        out["y"] = np.asarray(out["y"], np.int32)
        return out

    # ------------------------------------------------------------------ checkpointing
    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position (global batches consumed): the next batch after set_state(get_state()) is
        the next batch now, on this topology or any other."""
        return dict(
            format=STATE_FORMAT,
            position=int(self._position),
            bad_records=int(self._bad),
            bad_examples=list(self._bad_names),
            **self._identity,
        )

    def set_state(self, state: dict[str, Any] | str | bytes) -> None:
        """Continue from a state saved by get_state (same data, seed and global batch; any topology)."""
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        fmt = state.get("format")
        if fmt == _OLD_FORMAT:
            position = int(state.get("batches", 0))
            log.warning("the data state was saved by an older dit-jax whose order depended on the process count: "
                        "continuing after %d batches in the current global order (the examples differ from "
                        "what the old order would have given)", position)
            saved = {k: state.get(k, _IDENTITY_DEFAULTS.get(k)) for k in ("source", "seed", "images")}
        elif fmt == STATE_FORMAT:
            position = int(state["position"])
            saved = {k: state.get(k, _IDENTITY_DEFAULTS.get(k)) for k in self._identity}
        else:
            raise ValueError(f"not a dit-jax data iterator state (format {fmt!r})")
        if fmt == _OLD_FORMAT:  # its source repr named the old per-process wrapper: compare what still means
            saved["source"] = self._identity["source"]
        diff = {k: (saved[k], self._identity[k]) for k in saved if saved[k] != self._identity[k]}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"the data iterator state does not fit this pipeline ({detail})")
        self._start(position)
        self._bad = int(state.get("bad_records", 0))
        self._bad_names = list(state.get("bad_examples", []))

    def close(self) -> None:
        """Stop grain's worker processes (if any); set_state starts them again."""
        inner = getattr(self._it, "_iterator", None)
        if hasattr(inner, "close"):
            inner.close()
        self._it = None

    def __enter__(self) -> TrainIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ info
    def stats(self) -> dict[str, Any]:
        return dict(
            bad_records=int(self._bad),
            bad_examples=list(self._bad_names),
            batches=int(self._position),
            epoch=self._position * self.global_batch / max(self.num_records, 1),
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
        return f"TrainIterator({self._source!r}, rows={self.local_batch} of {self.global_batch}, {self._identity})"


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
    rows: Sequence[int] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    with_images: bool = False,
) -> TrainIterator:
    """An endless, checkpointable iterator of this process's rows of every global batch (module docstring).

    data_cfg: config.data (dit_jax.train.config_schema.base_config: every field, its default there): source
    ("digits" | "tfds" | "folder" | "latents"), name, split, data_dir ("" = TFDS's default), path, image_size,
    channels, random_flip, num_workers, num_classes.
    rows: the rows of each global batch this process reads, in order (the trainer passes those of its devices);
    default: block process_index of process_count (both default to JAX's).
    next(it) -> {"x": float32 (len(rows), H, W, C), "y": int32}; x in [-1, 1] for images, [mean | logvar] on the
    channel axis for latents. with_images (latents only): batches also carry "images", uint8 (len(rows), H', W',
    3), the stored images (see build_source).
    """
    global_batch = int(global_batch)
    if global_batch <= 0:
        raise ValueError(f"global_batch {global_batch} must be positive")
    if rows is None:
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        process_index, process_count = int(process_index), int(process_count)
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
        if global_batch % process_count:
            raise ValueError(f"global_batch {global_batch} is not a multiple of process_count {process_count}")
        local = global_batch // process_count
        rows = range(process_index * local, (process_index + 1) * local)
    rows = np.asarray(list(rows), np.int64)
    if rows.ndim != 1 or not len(rows) or rows.min() < 0 or rows.max() >= global_batch or len(set(rows.tolist())) != len(rows):
        raise ValueError(f"rows must be distinct indices in [0, {global_batch}), got {rows.tolist()[:16]}")
    seed = int(seed) % (2**32)
    num_workers = int(data_cfg.num_workers)

    if num_workers > 0:
        _absl_flags_parsed()
    source, ops, info = build_source(data_cfg, seed=seed, with_images=with_images)
    if len(source) == 0:
        raise ValueError(f"{source!r} has no records")
    identity = dict(source=repr(source), seed=seed, global_batch=global_batch, images=info["image_shape"] is not None)
    log.info("data: %r, %d records per epoch, %d of every %d examples read here, %d workers",
             source, len(source), len(rows), global_batch, num_workers)
    return TrainIterator(
        source, ops, order=GlobalOrder(len(source), seed), global_batch=global_batch, rows=rows,
        identity=identity, info=info, num_workers=num_workers,
        worker_buffer_size=WORKER_BUFFER_SIZE,
        read_options=grain.ReadOptions(
            num_threads=0 if info["kind"] == "digits" else READ_THREADS,
            prefetch_buffer_size=0 if info["kind"] == "digits" else READ_BUFFER,
        ),
    )
