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


def test_digits_fd_ranks_real_grainy_and_collapsed_samples():
    """The digits Frechet distance (a fixed MLP's hidden features): real digits are close to the real set (near the
    real-vs-real split), grainy copies further, a single repeated digit and blank images far away; it is
    deterministic (the feature net is trained once with a fixed seed)."""
    from dit_jax.evaluate.digits_classifier import _real_digits, digits_fd

    x, y = _real_digits(16)
    idx = np.random.default_rng(1).permutation(len(x))[:300]
    real = digits_fd(x[idx], 16)
    grainy_x = np.clip(x[idx].astype(int) + np.random.default_rng(0).integers(-60, 60, x[idx].shape), 0, 255)
    grainy = digits_fd(grainy_x.astype(np.uint8), 16)["digits_fd"]
    collapsed = digits_fd(np.repeat(x[y == 3][:1], 300, axis=0), 16)["digits_fd"]
    blank = digits_fd(np.zeros_like(x[idx]), 16)["digits_fd"]
    assert 0 < real["real_split_fd"] < real["digits_fd"] < grainy < collapsed
    assert real["digits_fd"] < 10 * real["real_split_fd"] and grainy > 1.2 * real["digits_fd"]
    assert blank > 20 * real["digits_fd"] and collapsed > 20 * real["digits_fd"]
    assert digits_fd(x[idx], 16) == real  # deterministic
