"""Improved precision and recall (Kynkäänniemi et al., 2019) as the ADM evaluation suite computes them.

guided-diffusion evaluations/evaluator.py ManifoldEstimator / DistanceBlock (adapted there from
kynkaat/improved-precision-and-recall-metric), with its defaults nhood_sizes=(3,), row and column batches of
10,000, clamp_to_percentile=None:

  * distances are *squared* Euclidean: max(|u|^2 - 2 u.v + |v|^2, 0). ADM evaluates them in float16 (inputs cast
    to float16) and falls back to float32 for a (row batch, column batch) block only when some float16 value of
    that block is not finite. We do the same per block (distance_dtype="float16", the default): inputs rounded
    to float16, the norms and the matmul accumulated in float32 and rounded to float16 (our reading of TF's
    float16 GPU kernels; not compared with TF itself), then the float16 sum and clamp. XLA may keep extra
    precision in fused float16 arithmetic, so a distance right at a ball's boundary can rarely compare
    differently from ADM. distance_dtype="float32" computes everything in float32 (HIGHEST matmul precision).
  * manifold radii: for each feature, the distance to its k-th nearest neighbour *within its own set, the point
    itself included*: ADM partitions the full row of distances (which holds the self-distance 0) and takes
    element k, so with k = 3 the radius is the 4th smallest value, i.e. the 3rd nearest *other* point
    (duplicates count as neighbours at distance 0).
  * a point is inside the other set's manifold when its squared distance to some point of that set is <= that
    point's radius (ties count as inside).
  * precision = fraction of samples inside the reference manifold; recall = fraction of reference points inside
    the sample manifold. Evaluator.compute_prec_recall(ref, sample) returns (precision, recall).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

BATCH_SIZE = 10_000  # ADM ManifoldEstimator row_batch_size = col_batch_size = 10000
NHOOD_SIZES = (3,)


# ----------------------------------------------------------------------------------------------------------
# Distances (jitted per block shape).
# ----------------------------------------------------------------------------------------------------------
def _squared_distances(u: jax.Array, v: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """(n, D), (m, D) -> (n, m) in `dtype`: max(|u|^2 - 2 u v^T + |v|^2, 0), evaluated left to right as ADM's
    _batch_pairwise_distances."""
    u = u.astype(dtype)
    v = v.astype(dtype)
    norm_u = jnp.sum(jnp.square(u), axis=1, dtype=jnp.float32).astype(dtype)[:, None]
    norm_v = jnp.sum(jnp.square(v), axis=1, dtype=jnp.float32).astype(dtype)[None, :]
    uv = jnp.matmul(u, v.T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32).astype(dtype)
    return jnp.maximum(norm_u - 2 * uv + norm_v, jnp.zeros((), dtype))


def _block_distances(u: jax.Array, v: jax.Array, half: bool) -> jax.Array:
    """ADM DistanceBlock: float16 distances when all of them are finite, else float32; returned as float32."""
    if not half:
        return _squared_distances(u, v, jnp.float32)
    d16 = _squared_distances(u, v, jnp.float16)
    return jax.lax.cond(
        jnp.all(jnp.isfinite(d16)),
        lambda: d16.astype(jnp.float32),
        lambda: _squared_distances(u, v, jnp.float32),
    )


@functools.partial(jax.jit, static_argnames=("half",))
def pairwise_distances(u: jax.Array, v: jax.Array, half: bool = True) -> jax.Array:
    """Squared distances (n, m) float32 between u (n, D) and v (m, D), with ADM's float16-first rule."""
    return _block_distances(u, v, half)


@functools.partial(jax.jit, static_argnames=("half", "k"))
def _merge_smallest(best: jax.Array, u: jax.Array, v: jax.Array, col_valid: jax.Array, half: bool, k: int):
    """best (n, k) ascending smallest distances so far, merged with the distances of u (n, D) to the valid rows of
    v (m, D) -> the new (n, k) ascending smallest."""
    d = jnp.where(col_valid[None, :], _block_distances(u, v, half), jnp.inf)
    neg, _ = jax.lax.top_k(-jnp.concatenate([best, d], axis=1), k)
    return -neg


@functools.partial(jax.jit, static_argnames=("half",))
def _less_thans(u: jax.Array, radii_u: jax.Array, v: jax.Array, radii_v: jax.Array, half: bool):
    """ADM DistanceBlock.less_thans: (u inside some ball of v (n, K), v inside some ball of u (m, K))."""
    d = _block_distances(u, v, half)[..., None]  # (n, m, 1)
    u_in = jnp.any(d <= radii_v[None, :, :], axis=1)
    v_in = jnp.any(d <= radii_u[:, None, :], axis=0)
    return u_in, v_in


def _pad_rows(x: np.ndarray, rows: int, value: float = 0.0) -> np.ndarray:
    if len(x) == rows:
        return x
    pad = np.full((rows - len(x), *x.shape[1:]), value, dtype=x.dtype)
    return np.concatenate([x, pad], axis=0)


# ----------------------------------------------------------------------------------------------------------
# The estimator.
# ----------------------------------------------------------------------------------------------------------
class ManifoldEstimator:
    """k-NN hypersphere manifolds of feature sets (ADM ManifoldEstimator, without the realism score).

    row_batch_size, col_batch_size: block sizes of the distance matrices (ADM 10,000); the last blocks are
    padded to a fixed shape (padding is masked out), so each distinct block shape compiles once.
    """

    def __init__(
        self,
        row_batch_size: int = BATCH_SIZE,
        col_batch_size: int = BATCH_SIZE,
        nhood_sizes: Sequence[int] = NHOOD_SIZES,
        clamp_to_percentile: float | None = None,
        distance_dtype: str = "float16",
    ):
        if distance_dtype not in ("float16", "float32"):
            raise ValueError(f"distance_dtype must be 'float16' (ADM) or 'float32', got {distance_dtype!r}")
        if row_batch_size < 1 or col_batch_size < 1:
            raise ValueError("batch sizes must be >= 1")
        self.row_batch_size = int(row_batch_size)
        self.col_batch_size = int(col_batch_size)
        self.nhood_sizes = tuple(int(k) for k in nhood_sizes)
        self.clamp_to_percentile = clamp_to_percentile
        self.half = distance_dtype == "float16"

    def manifold_radii(self, features: np.ndarray) -> np.ndarray:
        """features (N, D) -> radii (N, len(nhood_sizes)) float32: squared distance to the k-th nearest neighbour,
        the point itself counting as the 0-th (see the module docstring)."""
        feats = np.asarray(features, dtype=np.float32)
        n = len(feats)
        kmax = max(self.nhood_sizes)
        if n <= kmax:
            raise ValueError(f"need more than {kmax} features for k={kmax} nearest neighbours, got {n}")
        rows, cols = min(self.row_batch_size, n), min(self.col_batch_size, n)
        radii = np.zeros((n, len(self.nhood_sizes)), dtype=np.float32)
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            u = jnp.asarray(_pad_rows(feats[r0:r1], rows))
            best = jnp.full((rows, kmax + 1), jnp.inf, jnp.float32)
            for c0 in range(0, n, cols):
                c1 = min(c0 + cols, n)
                valid = jnp.asarray(np.arange(cols) < c1 - c0)
                best = _merge_smallest(best, u, jnp.asarray(_pad_rows(feats[c0:c1], cols)), valid, self.half, kmax + 1)
            radii[r0:r1] = np.asarray(best)[: r1 - r0][:, list(self.nhood_sizes)]
        if self.clamp_to_percentile is not None:
            max_distances = np.percentile(radii, self.clamp_to_percentile, axis=0)
            radii[radii > max_distances] = 0
        return radii

    def evaluate_pr(
        self, features_1: np.ndarray, radii_1: np.ndarray, features_2: np.ndarray, radii_2: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """ADM evaluate_pr. features_1 (N1, D) reference with radii_1 (N1, K), features_2 (N2, D) samples with
        radii_2 (N2, K) -> (precision (K,), recall (K,)) float64: the fraction of features_2 inside the manifold of
        features_1, and of features_1 inside the manifold of features_2."""
        f1 = np.asarray(features_1, dtype=np.float32)
        f2 = np.asarray(features_2, dtype=np.float32)
        r1 = np.asarray(radii_1, dtype=np.float32)
        r2 = np.asarray(radii_2, dtype=np.float32)
        n1, n2 = len(f1), len(f2)
        if r1.shape[0] != n1 or r2.shape[0] != n2 or r1.ndim != 2 or r2.ndim != 2:
            raise ValueError(f"radii {r1.shape}, {r2.shape} do not fit features {f1.shape}, {f2.shape}")
        status_1 = np.zeros((n1, r2.shape[1]), dtype=bool)
        status_2 = np.zeros((n2, r1.shape[1]), dtype=bool)
        rows, cols = min(self.row_batch_size, n1), min(self.col_batch_size, n2)
        for b1 in range(0, n1, rows):
            e1 = min(b1 + rows, n1)
            u = jnp.asarray(_pad_rows(f1[b1:e1], rows))
            ru = jnp.asarray(_pad_rows(r1[b1:e1], rows, -1.0))  # padding rows: empty balls
            for b2 in range(0, n2, cols):
                e2 = min(b2 + cols, n2)
                v = jnp.asarray(_pad_rows(f2[b2:e2], cols))
                rv = jnp.asarray(_pad_rows(r2[b2:e2], cols, -1.0))
                u_in, v_in = _less_thans(u, ru, v, rv, self.half)
                status_1[b1:e1] |= np.asarray(u_in)[: e1 - b1]
                status_2[b2:e2] |= np.asarray(v_in)[: e2 - b2]
        return np.mean(status_2.astype(np.float64), axis=0), np.mean(status_1.astype(np.float64), axis=0)


def compute_prec_recall(
    activations_ref: np.ndarray, activations_sample: np.ndarray, estimator: ManifoldEstimator | None = None
) -> tuple[float, float]:
    """(precision, recall) of pool features of the samples (N2, D) against the reference (N1, D), k = 3."""
    est = estimator if estimator is not None else ManifoldEstimator()
    radii_ref = est.manifold_radii(activations_ref)
    radii_sample = est.manifold_radii(activations_sample)
    precision, recall = est.evaluate_pr(activations_ref, radii_ref, activations_sample, radii_sample)
    return float(precision[0]), float(recall[0])
