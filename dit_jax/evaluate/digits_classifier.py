"""Is a generated digit recognisably the class it was conditioned on? A classifier trained on the real digits.

Logistic regression on the same 16x16 (or whatever size) upsampled scikit-learn digits the demo trains on; its
held-out accuracy on real digits is reported beside the accuracy on samples, so the number has a yardstick.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from dit_jax.data.sources import load_digits_arrays


def _features(images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 1) or float [-1, 1] -> (N, S*S) float in [-1, 1]."""
    x = np.asarray(images)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 127.5 - 1.0
    return x.reshape(len(x), -1)


def fit_digits_classifier(image_size: int, seed: int = 0) -> tuple[LogisticRegression, float]:
    """-> (classifier trained on 75% of the real digits, its accuracy on the other 25%)."""
    x, y = load_digits_arrays(image_size)
    # the samples go through uint8, so the classifier sees real digits the same way
    x = np.clip(127.5 * x + 128.0, 0, 255).astype(np.uint8)
    x_tr, x_te, y_tr, y_te = train_test_split(_features(x), y, test_size=0.25, random_state=seed, stratify=y)
    clf = LogisticRegression(max_iter=2000, C=0.5)
    clf.fit(x_tr, y_tr)
    return clf, float(clf.score(x_te, y_te))


def sample_accuracy(images: np.ndarray, labels: np.ndarray, image_size: int) -> dict[str, float]:
    """Accuracy of the real-digits classifier on generated images (uint8 (N, S, S, 1)) vs their labels."""
    clf, real_acc = fit_digits_classifier(image_size)
    pred = clf.predict(_features(images))
    per_class = {int(c): float(np.mean(pred[labels == c] == c)) for c in np.unique(labels)}
    return dict(sample_accuracy=float(np.mean(pred == labels)), real_test_accuracy=real_acc,
                worst_class_accuracy=min(per_class.values()))
