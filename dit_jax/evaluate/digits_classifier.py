"""Is a generated digit recognisably the class it was conditioned on, and do the samples look like the real digits?

Two yardsticks on the same 16x16 (or whatever size) upsampled scikit-learn digits the demo trains on, both fitted
once with a fixed seed and cached per image size:
- accuracy: logistic regression trained on 75% of the real digits; its held-out accuracy on real digits is
  reported beside the accuracy on samples, so the number has a scale.
- Frechet distance (FD): the Frechet distance of dit_jax.evaluate.fid (ADM's formula) between the samples and the
  real digits in the feature space of the 64-unit ReLU hidden layer of a small MLP classifier trained on the real
  digits (scikit-learn MLPClassifier, random_state 0). It sees class, stroke and shape statistics, so it rises
  for grainy, washed-out or mode-collapsed samples even where the accuracy stays at its ceiling. Its yardstick is
  the FD between two halves of the real digits (`real_split_fd`). Inception features would be meaningless on
  16x16 one-channel digits.
"""

from __future__ import annotations

import functools

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

from dit_jax.data.sources import load_digits_arrays
from dit_jax.evaluate.fid import compute_statistics

FEATURE_UNITS = 64  # the MLP's hidden layer: the feature space of the digits FD
SEED = 0


def _features(images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 1) or float [-1, 1] -> (N, S*S) float in [-1, 1]."""
    x = np.asarray(images)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 127.5 - 1.0
    return x.reshape(len(x), -1)


@functools.lru_cache(maxsize=4)
def _real_digits(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits_arrays(image_size)
    # the samples go through uint8, so the scorers see real digits the same way
    return np.clip(127.5 * x + 128.0, 0, 255).astype(np.uint8), y


@functools.lru_cache(maxsize=4)
def fit_digits_classifier(image_size: int, seed: int = SEED) -> tuple[LogisticRegression, float]:
    """-> (classifier trained on 75% of the real digits, its accuracy on the other 25%)."""
    x, y = _real_digits(image_size)
    x_tr, x_te, y_tr, y_te = train_test_split(_features(x), y, test_size=0.25, random_state=seed, stratify=y)
    clf = LogisticRegression(max_iter=2000, C=0.5)
    clf.fit(x_tr, y_tr)
    return clf, float(clf.score(x_te, y_te))


@functools.lru_cache(maxsize=4)
def _feature_net(image_size: int) -> tuple[MLPClassifier, float]:
    """The FD's feature network: an MLP trained on every real digit (fixed seed) and the FD of two halves of the
    real digits in its feature space (the floor an FD is compared against)."""
    x, y = _real_digits(image_size)
    net = MLPClassifier(hidden_layer_sizes=(FEATURE_UNITS,), alpha=1e-3, max_iter=500, random_state=SEED)
    net.fit(_features(x), y)
    a, b = train_test_split(np.arange(len(x)), test_size=0.5, random_state=SEED, stratify=y)
    feats = digit_features(x, net)
    split = compute_statistics(feats[a]).frechet_distance(compute_statistics(feats[b]))
    return net, float(split)


def digit_features(images: np.ndarray, net: MLPClassifier | None = None, image_size: int | None = None) -> np.ndarray:
    """Images (uint8 (N, S, S, 1) or float in [-1, 1]) -> (N, FEATURE_UNITS) float64 hidden activations."""
    if net is None:
        net = _feature_net(int(image_size or np.asarray(images).shape[1]))[0]
    return np.maximum(_features(images) @ net.coefs_[0] + net.intercepts_[0], 0.0)


def digits_fd(images: np.ndarray, image_size: int) -> dict[str, float]:
    """The Frechet distance between samples (uint8 (N, S, S, 1), N >= 2) and all real digits in the MLP's feature
    space, with the real-vs-real split FD as its yardstick."""
    net, split = _feature_net(image_size)
    real = compute_statistics(digit_features(_real_digits(image_size)[0], net))
    fd = compute_statistics(digit_features(images, net)).frechet_distance(real)
    return dict(digits_fd=float(fd), real_split_fd=split)


def sample_accuracy(images: np.ndarray, labels: np.ndarray, image_size: int) -> dict[str, float]:
    """Accuracy of the real-digits classifier on generated images (uint8 (N, S, S, 1)) vs their labels."""
    clf, real_acc = fit_digits_classifier(image_size)
    pred = clf.predict(_features(images))
    per_class = {int(c): float(np.mean(pred[labels == c] == c)) for c in np.unique(labels)}
    return dict(sample_accuracy=float(np.mean(pred == labels)), real_test_accuracy=real_acc,
                worst_class_accuracy=min(per_class.values()))


def sample_quality(images: np.ndarray, labels: np.ndarray, image_size: int) -> dict[str, float]:
    """sample_accuracy and digits_fd together (what the demo reports)."""
    return dict(**sample_accuracy(images, labels, image_size), **digits_fd(images, image_size))
