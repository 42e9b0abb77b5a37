"""Fréchet distance between Gaussian fits of Inception features: FID (pool_3, 2048-d) and sFID (spatial, 2023-d).

Follows the ADM evaluation suite (openai/guided-diffusion evaluations/evaluator.py, FIDStatistics and
Evaluator.compute_statistics, itself from bioinf-jku/TTUR fid.py):

    statistics:  mu = mean(acts, axis=0), sigma = np.cov(acts, rowvar=False)   (float64; N - 1 denominator)
    distance:    |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 @ sigma2))
                 with scipy.linalg.sqrtm; when the square root is not finite, retry with eps * I (eps 1e-6) added
                 to both covariances (and warn); a complex result is accepted when the imaginary parts of its
                 diagonal are all within 1e-3 of 0 (then the real part is used), otherwise ValueError.

One deliberate difference: ADM's mu is np.mean of float32 activations, i.e. float32; we accumulate the mean in
float64 and compute the distance in float64 throughout (a relative change of order 1e-7 in the mean term).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Protocol

import numpy as np
from scipy import linalg

FID_EPS = 1e-6  # ADM FIDStatistics.frechet_distance(eps=1e-6)
IMAG_ATOL = 1e-3  # np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """scipy.linalg.sqrtm, quiet about singular input as ADM's sqrtm(..., disp=False) is (the caller checks the
    result). An indirection so that tests can count or replace the O(d^3) call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


@dataclasses.dataclass
class FIDStatistics:
    """Gaussian fit of a feature set: mu (D,), sigma (D, D)."""

    mu: np.ndarray
    sigma: np.ndarray

    def frechet_distance(self, other: FIDStatistics, eps: float = FID_EPS) -> float:
        """FID between this fit (ADM: the samples) and `other` (the reference)."""
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, eps=eps)


def compute_statistics(activations: np.ndarray) -> FIDStatistics:
    """activations (N, D) -> FIDStatistics(mean (D,) float64, covariance (D, D) float64 with N - 1 denominator)."""
    acts = np.asarray(activations)
    if acts.ndim != 2 or acts.shape[0] < 2:
        raise ValueError(f"need activations (N >= 2, D), got shape {acts.shape}")
    mu = np.mean(acts, axis=0, dtype=np.float64)
    sigma = np.cov(acts, rowvar=False)  # float64, as in ADM
    return FIDStatistics(mu, np.atleast_2d(sigma))


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = FID_EPS
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) exactly as ADM computes it (see module doc).

    mu: (D,), sigma: (D, D). Raises ValueError on mismatched shapes or a significant imaginary component.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different lengths: {mu1.shape}, {mu2.shape}")
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"covariances have different dimensions: {sigma1.shape}, {sigma2.shape}")
    if sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"covariance {sigma1.shape} does not fit the mean {mu1.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))  # the product might be almost singular
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates", stacklevel=2
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):  # numerical error might give a slight imaginary component
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAG_ATOL):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


class _FeatureExtractor(Protocol):
    def activations(self, images: Any) -> Any: ...


def fid_from_images(images: Any, reference_stats: FIDStatistics, evaluator: _FeatureExtractor) -> float:
    """FID of a batch of images against reference statistics, e.g. a small-N FID logged during training.

    images: (N, H, W, 3) uint8 (or float in [0, 255]); reference_stats: FIDStatistics of pool features (from
    dit_jax.evaluate.npz.read_reference_statistics or Evaluator.read_statistics); evaluator: an Evaluator.
    With N well below 2048 the covariance is rank-deficient and the value is biased upwards: compare small-N
    FIDs only with each other (same N, same reference).
    """
    acts = evaluator.activations(images)
    return compute_statistics(acts.pool).frechet_distance(reference_stats)
