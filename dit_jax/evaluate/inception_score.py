"""Inception Score as the ADM evaluation suite computes it (guided-diffusion evaluations/evaluator.py
Evaluator.compute_inception_score, after openai/improved-gan inception_score/model.py):

    preds = softmax(pool_3 @ softmax/weights)        1008 classes, the weight matrix only: no bias is added
    for each split of `split_size` (5000) *consecutive* samples (the last one may be shorter):
        score = exp(mean_i sum_c p_ic (log p_ic - log mean_i p_ic))
    IS = mean of the split scores (ADM returns the mean only, not the standard deviation)

All in float32, as ADM (TF softmax output, numpy float32 arithmetic). The one difference: terms with p_ic == 0
count as 0 (the limit of p log p) where ADM's 0 * log(0) would make the score NaN; a float32 softmax only
underflows to 0 for logit gaps above ~100, so on real Inception logits both agree.
"""

from __future__ import annotations

import numpy as np

SPLIT_SIZE = 5000  # ADM compute_inception_score(split_size=5000)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, C) logits in float32 (max-subtracted, as tf.nn.softmax)."""
    x = np.asarray(logits, dtype=np.float32)
    e = np.exp(x - np.max(x, axis=1, keepdims=True))
    return (e / np.sum(e, axis=1, keepdims=True)).astype(np.float32)


def _split_score(part: np.ndarray) -> np.float32:
    marginal = np.mean(part, axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = part * (np.log(part) - np.log(marginal))
    kl = np.where(part > 0, kl, np.float32(0))  # 0 log 0 = 0 (see the module docstring)
    return np.exp(np.mean(np.sum(kl, axis=1)))


def inception_score(preds: np.ndarray, split_size: int = SPLIT_SIZE) -> float:
    """Mean over consecutive splits of exp(E KL(p(y|x) || p(y))). preds: (N, C) class probabilities (rows sum to 1)."""
    p = np.asarray(preds, dtype=np.float32)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"expected class probabilities (N >= 1, C), got shape {p.shape}")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    scores = [_split_score(p[i : i + split_size]) for i in range(0, len(p), split_size)]
    return float(np.mean(scores))


def inception_score_from_logits(logits: np.ndarray, split_size: int = SPLIT_SIZE) -> float:
    """inception_score(softmax(logits)); logits (N, 1008) = pool_3 @ softmax/weights (InceptionV3 "logits")."""
    return inception_score(softmax(logits), split_size)
