"""Inception activations of image batches on every local device, and the ADM metrics of two .npz files.

    model = load_inception_file("pt_inception-2015-12-05-6726825d.pth")
    evaluator = Evaluator(model, batch_size=256)
    metrics = evaluate_npz("samples.npz", "VIRTUAL_imagenet256_labeled.npz", evaluator)
    # {"inception_score": ..., "fid": ..., "sfid": ..., "precision": ..., "recall": ...}

The Inception forward is one jitted function over pure pytrees (nnx.split once, nnx.merge inside), with the
weights replicated and the batch sharded over a 1-D mesh ('batch',) of the local devices. Every call sees the
same padded batch shape (the last batch is padded with zeros and the padding dropped), so it compiles once per
image size; the compiled function is shared by every Evaluator of the same graph in the process. The next batch
is dispatched before the previous one is copied back, so reading the .npz overlaps with the device work.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dit_jax.evaluate import npz
from dit_jax.evaluate.fid import FIDStatistics, compute_statistics
from dit_jax.evaluate.inception_score import SPLIT_SIZE, inception_score_from_logits
from dit_jax.evaluate.precision_recall import ManifoldEstimator, compute_prec_recall
from dit_jax.models.inception import InceptionV3

DEFAULT_BATCH_SIZE = 256
# Metric keys in the order ADM prints them, with the names it prints.
METRIC_NAMES = (
    ("inception_score", "Inception Score"),
    ("fid", "FID"),
    ("sfid", "sFID"),
    ("precision", "Precision"),
    ("recall", "Recall"),
)


@dataclasses.dataclass
class Activations:
    """Inception features of N images (float32): pool (N, 2048), spatial (N, 2023), logits (N, 1008)."""

    pool: np.ndarray
    spatial: np.ndarray
    logits: np.ndarray

    def __len__(self) -> int:
        return len(self.pool)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef: nnx.GraphDef, state: Any, images: jax.Array) -> dict[str, jax.Array]:
    return nnx.merge(graphdef, state)(images)


def _check_batch(batch: np.ndarray) -> np.ndarray:
    batch = np.asarray(batch)
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected images (N, H, W, 3) NHWC, got shape {batch.shape}")
    if batch.dtype != np.uint8 and not np.issubdtype(batch.dtype, np.floating):
        raise ValueError(f"expected uint8 (or float in [0, 255]) images, got {batch.dtype}")
    return batch


class Evaluator:
    """Batches images through a jitted, data-parallel InceptionV3 and computes the ADM suite's statistics.

    model: an InceptionV3 with the FID weights (dit_jax.convert.load_inception_file). batch_size: images per
    device call over all devices (rounded up to a multiple of the device count). devices: default
    jax.local_devices(). progress: a tqdm bar per pass over a file or array.
    """

    def __init__(self, model: InceptionV3, *, batch_size: int = DEFAULT_BATCH_SIZE, devices: Any = None,
                 progress: bool = True, estimator: ManifoldEstimator | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        devs = np.asarray(jax.local_devices() if devices is None else devices).reshape(-1)
        self.mesh = Mesh(devs, ("batch",))
        self.batch_size = math.ceil(batch_size / devs.size) * devs.size
        self.progress = progress
        self.estimator = estimator if estimator is not None else ManifoldEstimator()
        self.graphdef, state = nnx.split(model)
        self.state = jax.device_put(state, NamedSharding(self.mesh, P()))
        self.batch_sharding = NamedSharding(self.mesh, P("batch"))

    @classmethod
    def from_file(cls, weights: str, *, dtype: Any = None, **kw: Any) -> Evaluator:
        """An Evaluator over the Inception weights at `weights` (see dit_jax.convert.inception)."""
        from dit_jax.convert.inception import load_inception_file

        return cls(load_inception_file(weights, dtype=dtype), **kw)

    # -- activations ----------------------------------------------------------------------------------
    def _dispatch(self, batch: np.ndarray) -> tuple[dict[str, jax.Array], int]:
        batch = _check_batch(batch)
        n = len(batch)
        if n > self.batch_size:
            raise ValueError(f"batch of {n} images exceeds batch_size {self.batch_size}")
        if n < self.batch_size:
            pad = np.zeros((self.batch_size - n, *batch.shape[1:]), dtype=batch.dtype)
            batch = np.concatenate([batch, pad], axis=0)
        return _forward(self.graphdef, self.state, jax.device_put(batch, self.batch_sharding)), n

    def compute_activations(self, batches: Iterable[np.ndarray], total: int | None = None,
                            desc: str = "inception") -> Activations:
        """Activations of consecutive image batches (each (b <= batch_size, H, W, 3), uint8 or float [0, 255])."""
        from tqdm.auto import tqdm

        out: dict[str, list[np.ndarray]] = {"pool": [], "spatial": [], "logits": []}

        def collect(pending: tuple[dict[str, jax.Array], int]) -> None:
            feats, n = pending
            for k in out:
                out[k].append(np.asarray(jax.device_get(feats[k]))[:n])
            bar.update(n)

        with tqdm(total=total, desc=desc, unit="img", disable=not self.progress, file=sys.stderr) as bar:
            pending = None
            for batch in batches:
                current = self._dispatch(batch)  # dispatched asynchronously
                if pending is not None:
                    collect(pending)
                pending = current
            if pending is not None:
                collect(pending)
        if not out["pool"]:
            raise ValueError("no images")
        return Activations(**{k: np.concatenate(v, axis=0) for k, v in out.items()})

    def activations(self, images: np.ndarray) -> Activations:
        """Activations of an in-memory array of images (N, H, W, 3), uint8 or float in [0, 255]."""
        images = _check_batch(images)
        chunks = (images[i : i + self.batch_size] for i in range(0, len(images), self.batch_size))
        return self.compute_activations(chunks, total=len(images))

    def read_activations(self, path: str) -> Activations:
        """Activations of arr_0 of an ADM .npz, streamed in batches (checked to be uint8 NHWC RGB)."""
        n = npz.read_images_header(path)[0]
        return self.compute_activations(npz.iter_image_batches(path, self.batch_size), total=n, desc=str(path))

    # -- statistics and metrics -----------------------------------------------------------------------
    def read_statistics(self, path: str, activations: Activations) -> tuple[FIDStatistics, FIDStatistics]:
        """(pool, spatial) statistics: the file's mu/sigma/mu_s/sigma_s when it has "mu", else computed from
        `activations` (ADM Evaluator.read_statistics)."""
        stored = npz.read_reference_statistics(path)
        if stored is not None:
            return stored
        return compute_statistics(activations.pool), compute_statistics(activations.spatial)

    def compute_inception_score(self, activations: Activations, split_size: int = SPLIT_SIZE) -> float:
        return inception_score_from_logits(activations.logits, split_size)

    def compute_prec_recall(self, ref: Activations, sample: Activations) -> tuple[float, float]:
        return compute_prec_recall(ref.pool, sample.pool, self.estimator)


def compute_metrics(
    sample_acts: Activations,
    ref_acts: Activations,
    sample_stats: tuple[FIDStatistics, FIDStatistics],
    ref_stats: tuple[FIDStatistics, FIDStatistics],
    estimator: ManifoldEstimator | None = None,
) -> dict[str, float]:
    """The five ADM numbers, in ADM's order: inception_score, fid, sfid, precision, recall."""
    precision, recall = compute_prec_recall(ref_acts.pool, sample_acts.pool, estimator)
    return dict(
        inception_score=inception_score_from_logits(sample_acts.logits),
        fid=sample_stats[0].frechet_distance(ref_stats[0]),
        sfid=sample_stats[1].frechet_distance(ref_stats[1]),
        precision=precision,
        recall=recall,
    )


def evaluate_npz(samples: str, reference: str, evaluator: Evaluator,
                 log: Callable[[str], None] | None = None) -> dict[str, float]:
    """ADM evaluator.py main(): reference activations and statistics, sample activations and statistics, then
    Inception Score, FID, sFID, precision and recall. `log` receives progress messages."""
    say = log or (lambda s: None)
    say("computing reference batch activations...")
    ref_acts = evaluator.read_activations(reference)
    say("computing/reading reference batch statistics...")
    ref_stats = evaluator.read_statistics(reference, ref_acts)
    say("computing sample batch activations...")
    sample_acts = evaluator.read_activations(samples)
    say("computing/reading sample batch statistics...")
    sample_stats = evaluator.read_statistics(samples, sample_acts)
    say("Computing evaluations...")
    return compute_metrics(sample_acts, ref_acts, sample_stats, ref_stats, evaluator.estimator)


def iter_metric_lines(metrics: dict[str, float]) -> Iterator[str]:
    """'Inception Score: 123.4', 'FID: ...', ... as ADM prints them (print(name + ":", value))."""
    for key, name in METRIC_NAMES:
        yield f"{name}: {metrics[key]}"
