"""The demo's yardstick: a classifier trained on real digits recognises real digits and not noise."""

import numpy as np

from dit_jax.data.sources import load_digits_arrays
from dit_jax.evaluate.digits_classifier import fit_digits_classifier, sample_accuracy


def test_classifier_recognises_real_digits_not_noise():
    clf, real_acc = fit_digits_classifier(16)
    assert real_acc > 0.93
    x, y = load_digits_arrays(16)
    real = np.clip(127.5 * x[:200] + 128, 0, 255).astype(np.uint8)
    assert sample_accuracy(real, y[:200], 16)["sample_accuracy"] > 0.93
    noise = np.random.default_rng(0).integers(0, 256, (200, 16, 16, 1), dtype=np.uint8)
    labels = np.arange(200) % 10
    assert sample_accuracy(noise, labels, 16)["sample_accuracy"] < 0.3
