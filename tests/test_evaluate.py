"""The ADM evaluation suite (dit_jax.evaluate): FID / sFID, Inception Score, precision / recall, the .npz files and
`dit-jax evaluate` end to end.

Metrics are checked against scipy / numpy references on random features and on small cases worked out by hand
(the expected numbers are derived in the comments); the .npz files against np.load and a transcription of ADM's
own streaming reader (guided-diffusion evaluations/evaluator.py open_npz_array).
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from scipy import linalg

from dit_jax.evaluate import fid as fid_module
from dit_jax.evaluate.evaluator import Activations, Evaluator, compute_metrics
from dit_jax.evaluate.fid import FIDStatistics, compute_statistics, fid_from_images, frechet_distance
from dit_jax.evaluate.inception_score import inception_score, inception_score_from_logits, softmax
from dit_jax.evaluate.npz import (
    NpzFormatError,
    iter_image_batches,
    read_images_header,
    read_reference_statistics,
    write_reference_npz,
    write_samples_npz,
)
from dit_jax.evaluate.precision_recall import ManifoldEstimator, compute_prec_recall, pairwise_distances


# ----------------------------------------------------------------------------------------------------------
# FID.
# ----------------------------------------------------------------------------------------------------------
def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Reference FID written out plainly: float64 numpy statistics and scipy.linalg.sqrtm."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_scipy_sqrtm_on_random_features():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(64, 64)) / 8
    a = rng.normal(size=(2000, 64)).astype(np.float32)
    b = (rng.normal(size=(2000, 64)) @ mix + 0.3).astype(np.float32)
    got = compute_statistics(a).frechet_distance(compute_statistics(b))
    want = _scipy_fid(a, b)
    assert want > 1.0
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
    # independent of sqrtm: tr sqrt(S1 S2) = sum of sqrt of the eigenvalues of S1^1/2 S2 S1^1/2 (symmetric)
    s1, s2 = np.cov(a.astype(np.float64), rowvar=False), np.cov(b.astype(np.float64), rowvar=False)
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)))
    d = a.mean(0, dtype=np.float64) - b.mean(0, dtype=np.float64)
    assert got == pytest.approx(d @ d + np.trace(s1) + np.trace(s2) - 2 * tr, rel=1e-6)


def test_fid_identical_statistics_is_zero():
    a = np.random.default_rng(1).normal(size=(500, 32))
    s = compute_statistics(a)
    assert abs(s.frechet_distance(s)) < 1e-9 * np.trace(s.sigma)


def test_fid_by_hand():
    # Diagonal covariances commute: FID = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2
    #   = (1 + 4) + (1 - 2)^2 + (2 - 3)^2 = 7
    assert frechet_distance([0, 0], np.diag([1.0, 4.0]), [1, 2], np.diag([4.0, 9.0])) == pytest.approx(7.0, abs=1e-12)
    # 1-D: (0 - 3)^2 + (2 - 1)^2 = 10
    assert frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(10.0, abs=1e-12)


def test_statistics_are_float64_mean_and_unbiased_covariance():
    a = np.random.default_rng(2).normal(size=(50, 3)).astype(np.float32)
    s = compute_statistics(a)
    assert s.mu.dtype == np.float64 and s.sigma.dtype == np.float64
    np.testing.assert_allclose(s.sigma, (a - a.mean(0)).T.astype(np.float64) @ (a - a.mean(0)) / 49, rtol=1e-5)


def test_fid_singular_product_retries_with_eps(monkeypatch):
    calls = []

    def fake_sqrtm(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else linalg.sqrtm(m)

    monkeypatch.setattr(fid_module, "_sqrtm", fake_sqrtm)
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 9.0])
    with pytest.warns(UserWarning, match="adding 1e-06 to diagonal"):
        value = frechet_distance([0, 0], s1, [1, 2], s2)
    eye = np.eye(2) * 1e-6
    np.testing.assert_array_equal(calls[1], (s1 + eye) @ (s2 + eye))  # ADM's offset on both covariances
    assert value == pytest.approx(7.0, abs=1e-5)


def test_fid_imaginary_component_tolerance(monkeypatch):
    s = np.diag([1.0, 4.0])
    monkeypatch.setattr(fid_module, "_sqrtm", lambda m: linalg.sqrtm(m) + 5e-4j)  # within atol 1e-3: real part
    assert frechet_distance([0, 0], s, [0, 0], s) == pytest.approx(0.0, abs=1e-12)
    monkeypatch.setattr(fid_module, "_sqrtm", lambda m: linalg.sqrtm(m) + 1e-2j)
    with pytest.raises(ValueError, match="Imaginary component"):
        frechet_distance([0, 0], s, [0, 0], s)


def test_fid_from_images_uses_the_evaluator():
    class FakeEvaluator:
        def activations(self, images):
            flat = np.asarray(images, np.float32).reshape(len(images), -1)
            return Activations(pool=flat, spatial=flat, logits=flat)

    images = np.random.default_rng(3).integers(0, 256, (20, 2, 2, 3)).astype(np.uint8)
    ref = compute_statistics(np.random.default_rng(4).normal(size=(30, 12)))
    want = frechet_distance(*vars(compute_statistics(images.reshape(20, -1).astype(np.float32))).values(),
                            ref.mu, ref.sigma)
    assert fid_from_images(images, ref, FakeEvaluator()) == pytest.approx(want, rel=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Inception Score.
# ----------------------------------------------------------------------------------------------------------
def test_inception_score_uniform_is_one():
    assert inception_score(np.full((10, 1008), 1 / 1008, np.float32)) == pytest.approx(1.0, abs=1e-5)


def test_inception_score_one_hot_over_k_classes_is_k():
    # p(y|x) one-hot, p(y) uniform over K classes: KL = log K for every sample -> exp(log K) = K
    k = 4
    preds = np.eye(10, dtype=np.float32)[np.arange(12) % k]
    assert inception_score(preds) == pytest.approx(k, rel=1e-6)


def test_inception_score_by_hand_two_samples():
    # p1 = (1/2, 1/2), p2 = (1, 0); marginal (3/4, 1/4)
    # KL1 = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3); KL2 = ln(4/3); mean 3/4 ln(4/3) -> IS = (4/3)^(3/4)
    preds = np.array([[0.5, 0.5], [1.0, 0.0]], np.float32)
    assert inception_score(preds) == pytest.approx((4 / 3) ** 0.75, rel=1e-6)


def test_inception_score_splits_are_consecutive_and_averaged():
    # split_size 4 over 10 samples: [0:4] one-hot over 4 classes (4), [4:8] all class 0 (1), [8:10] two classes (2)
    labels = np.array([0, 1, 2, 3, 0, 0, 0, 0, 5, 6])
    preds = np.eye(8, dtype=np.float32)[labels]
    assert inception_score(preds, split_size=4) == pytest.approx((4 + 1 + 2) / 3, rel=1e-6)
    assert inception_score(preds, split_size=10) == pytest.approx(np.exp(-np.sum(
        np.bincount(labels) / 10 * np.log(np.maximum(np.bincount(labels) / 10, 1e-30)))), rel=1e-6)


def test_inception_score_from_logits_is_softmax_then_score():
    logits = np.random.default_rng(5).normal(size=(30, 1008)).astype(np.float32) * 3
    p = softmax(logits)
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-5)
    assert p.dtype == np.float32
    assert inception_score_from_logits(logits, 7) == inception_score(p, 7)


# ----------------------------------------------------------------------------------------------------------
# Precision and recall.
# ----------------------------------------------------------------------------------------------------------
# 1-D points with integer coordinates (every squared distance is an integer below 2048, exact in float16).
REF = np.array([0, 1, 2, 3, 10, 40], np.float32)[:, None]
SAMPLES = np.array([5, 13, 18, -3, -4], np.float32)[:, None]
# k = 3 with the point itself counted (ADM partitions the whole row, self-distance 0 included): the radius is the
# 4th smallest squared distance of the row. REF: 0 -> [0,1,4,9,100,1600] -> 9; 1 -> [0,1,1,4,81,1521] -> 4;
# 2 -> [0,1,1,4,64,1444] -> 4; 3 -> [0,1,4,9,49,1369] -> 9; 10 -> [0,49,64,81,100,900] -> 81;
# 40 -> [0,900,1369,1444,1521,1600] -> 1444.
REF_RADII = [9, 4, 4, 9, 81, 1444]
# SAMPLES: 5 -> [0,64,64,81,169] -> 81; 13 -> [0,25,64,256,289] -> 256; 18 -> [0,25,169,441,484] -> 441;
# -3 -> [0,1,64,256,441] -> 256; -4 -> [0,1,81,289,484] -> 289.
SAMPLE_RADII = [81, 256, 441, 256, 289]
# precision: 5 (to 3: 4 <= 9), 13 (to 10: 9 <= 81), 18 (to 10: 64 <= 81), -3 (to 0: 9 <= 9, a tie counts) are in;
# -4 is out (16 > 9 to 0, 25 > 4 to 1, ..., 1936 > 1444 to 40) -> 4/5. Without the self-distance the radius of 0
# would be 16 and -4 would be in.
# recall: 0, 1, 2, 3, 10 are within 81 of sample 5; 40 is out (484 > 441 to 18, 729 > 256 to 13, ...) -> 5/6.
PRECISION, RECALL = 0.8, 5 / 6


@pytest.mark.parametrize("distance_dtype", ["float16", "float32"])
@pytest.mark.parametrize("batches", [(10_000, 10_000), (2, 3), (4, 1)])
def test_precision_recall_by_hand(distance_dtype, batches):
    est = ManifoldEstimator(row_batch_size=batches[0], col_batch_size=batches[1], distance_dtype=distance_dtype)
    np.testing.assert_array_equal(est.manifold_radii(REF)[:, 0], REF_RADII)
    np.testing.assert_array_equal(est.manifold_radii(SAMPLES)[:, 0], SAMPLE_RADII)
    precision, recall = compute_prec_recall(REF, SAMPLES, est)
    assert precision == pytest.approx(PRECISION) and recall == pytest.approx(RECALL)


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(6)
    ref = rng.normal(size=(40, 8)).astype(np.float32)
    sample = (np.random.default_rng(7).normal(size=(30, 8)) + 1.0).astype(np.float32)  # shifted: P 0.8, R 0.55

    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, 3]  # self included

    d = ((sample[:, None] - ref[None]) ** 2).sum(-1)  # (30, 40)
    want_precision = np.mean(np.any(d <= radii(ref)[None, :], axis=1))
    want_recall = np.mean(np.any(d <= radii(sample)[:, None], axis=0))
    est = ManifoldEstimator(row_batch_size=16, col_batch_size=7, distance_dtype="float32")
    np.testing.assert_allclose(est.manifold_radii(ref)[:, 0], radii(ref), rtol=1e-5)
    got = compute_prec_recall(ref, sample, est)
    assert got == pytest.approx((want_precision, want_recall))
    assert 0 < got[0] < 1 and 0 < got[1] < 1


def test_pairwise_distances_float16_first_then_float32_fallback():
    u = np.array([[0.1, 0.2], [1.0, 3.0]], np.float32)
    v = np.array([[0.3, 0.0]], np.float32)
    d16 = np.asarray(pairwise_distances(u, v))
    d32 = np.asarray(pairwise_distances(u, v, half=False))
    np.testing.assert_allclose(d32[:, 0], [0.08, 9.49], rtol=1e-6)
    assert d16.dtype == np.float32 and not np.array_equal(d16, d32)  # float16 precision, as ADM
    np.testing.assert_allclose(d16, d32, rtol=2e-3, atol=1e-3)
    big = np.array([[300.0, 0.0]], np.float32)  # |u|^2 = 90000 overflows float16 -> the block falls back to float32
    np.testing.assert_array_equal(np.asarray(pairwise_distances(big, v)), np.asarray(pairwise_distances(big, v,
                                                                                                         half=False)))


def test_manifold_radii_needs_more_than_k_points():
    with pytest.raises(ValueError, match="more than 3"):
        ManifoldEstimator().manifold_radii(np.zeros((3, 2), np.float32))


# ----------------------------------------------------------------------------------------------------------
# .npz files.
# ----------------------------------------------------------------------------------------------------------
def adm_read_arr0(path: Path, batch_size: int) -> np.ndarray:
    """A transcription of ADM's open_npz_array + StreamingNpzArrayReader (evaluations/evaluator.py)."""
    with open(path, "rb") as f, zipfile.ZipFile(f, "r") as zip_f:
        assert "arr_0.npy" in zip_f.namelist()
        with zip_f.open("arr_0.npy", "r") as arr_f:
            version = np.lib.format.read_magic(arr_f)
            assert version in ((1, 0), (2, 0))  # otherwise ADM loads the whole file instead
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(arr_f)
            assert not fortran and not dtype.hasobject  # the streaming path
            out, idx = [], 0
            while idx < shape[0]:
                bs = min(batch_size, shape[0] - idx)
                idx += bs
                data = arr_f.read(int(bs * np.prod(shape[1:]) * dtype.itemsize))
                out.append(np.frombuffer(data, dtype=dtype).reshape([bs, *shape[1:]]))
    return np.concatenate(out)


def test_write_samples_npz_is_what_adm_reads(tmp_path):
    images = np.random.default_rng(7).integers(0, 256, (7, 5, 6, 3)).astype(np.uint8)
    path = write_samples_npz(tmp_path / "samples.npz", images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]  # no temporary file left
    with np.load(path) as z:
        assert z.files == ["arr_0"]
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (7, 5, 6, 3)
        np.testing.assert_array_equal(z["arr_0"], images)
    np.testing.assert_array_equal(adm_read_arr0(path, batch_size=3), images)
    # byte-identical member to np.savez(path, images) (uncompressed, .npy format 1.0)
    np.savez(tmp_path / "numpy.npz", images)
    with zipfile.ZipFile(path) as ours, zipfile.ZipFile(tmp_path / "numpy.npz") as theirs:
        assert [i.compress_type for i in ours.infolist()] == [zipfile.ZIP_STORED]
        assert ours.read("arr_0.npy") == theirs.read("arr_0.npy")
        assert ours.read("arr_0.npy")[6:8] == b"\x01\x00"
    # streamed in batches, any batch size
    batches = list(iter_image_batches(path, 3))
    assert [len(b) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    assert read_images_header(path) == (7, 5, 6, 3)


def test_compressed_npz_streams_too(tmp_path):
    images = np.random.default_rng(8).integers(0, 256, (5, 4, 4, 3)).astype(np.uint8)
    np.savez_compressed(tmp_path / "c.npz", images)
    np.testing.assert_array_equal(np.concatenate(list(iter_image_batches(tmp_path / "c.npz", 2))), images)


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((2, 4, 4, 3), np.float32), "dtype float32"),
        (np.zeros((2, 3, 4, 4), np.uint8), "NHWC"),
        (np.zeros((2, 4, 4), np.uint8), "4-D"),
        (np.zeros((2, 4, 4, 1), np.uint8), "1 channels"),
    ],
)
def test_bad_images_are_refused(tmp_path, array, match):
    np.savez(tmp_path / "bad.npz", array)
    with pytest.raises(NpzFormatError, match=match):
        read_images_header(tmp_path / "bad.npz")
    with pytest.raises(NpzFormatError, match=match):
        write_samples_npz(tmp_path / "out.npz", array)
    assert not (tmp_path / "out.npz").exists()


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(NpzFormatError, match="no such file"):
        read_images_header(tmp_path / "absent.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(NpzFormatError, match="not an .npz"):
        read_images_header(tmp_path / "text.npz")
    np.savez(tmp_path / "named.npz", images=np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(NpzFormatError, match="missing arr_0"):
        read_images_header(tmp_path / "named.npz")


def test_reference_statistics(tmp_path):
    rng = np.random.default_rng(9)
    images = rng.integers(0, 256, (4, 3, 3, 3)).astype(np.uint8)
    pool, spatial = compute_statistics(rng.normal(size=(9, 5))), compute_statistics(rng.normal(size=(9, 4)))
    path = write_reference_npz(tmp_path / "ref.npz", images, pool, spatial)
    with np.load(path) as z:  # what ADM's read_statistics looks up
        assert sorted(z.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
        assert z["arr_0"].dtype == np.uint8 and z["mu"].dtype == np.float64 and z["sigma_s"].shape == (4, 4)
    got = read_reference_statistics(path)
    np.testing.assert_array_equal(got[0].mu, pool.mu)
    np.testing.assert_array_equal(got[1].sigma, spatial.sigma)
    np.testing.assert_array_equal(adm_read_arr0(path, 2), images)
    assert read_reference_statistics(write_samples_npz(tmp_path / "plain.npz", images)) is None
    np.savez(tmp_path / "partial.npz", arr_0=images, mu=pool.mu, sigma=pool.sigma)
    with pytest.raises(NpzFormatError, match="mu_s"):
        read_reference_statistics(tmp_path / "partial.npz")


# ----------------------------------------------------------------------------------------------------------
# `dit-jax evaluate`, end to end with random Inception weights.
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """(weights file, Evaluator) for random weights in the pytorch-fid layout written with torch.save."""
    torch = pytest.importorskip("torch")
    from inception_reference import random_inception_state_dict

    from dit_jax.convert.inception import load_inception_file
    from dit_jax.evaluate.evaluator import Evaluator

    path = tmp_path_factory.mktemp("weights") / "pt_inception-random.pth"
    torch.save({k: torch.from_numpy(v) for k, v in random_inception_state_dict(seed=1).items()}, path)
    return path, Evaluator(load_inception_file(path), batch_size=8, progress=False)


def _fast_sqrtm(m: np.ndarray) -> np.ndarray:
    """Stand-in for scipy's sqrtm on 2048 x 2048 (~15 s on 2 cores); the real one is tested above and in the slow
    variant. Only the plumbing is under test with it."""
    return np.diag(np.sqrt(np.clip(np.diag(m), 0, None)))


def _memoised_sqrtm():
    cache: dict[bytes, np.ndarray] = {}

    def sqrtm(m: np.ndarray) -> np.ndarray:
        key = m.tobytes()
        if key not in cache:
            cache[key] = linalg.sqrtm(m)
        return cache[key]

    return sqrtm


@pytest.mark.parametrize("real_sqrtm", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_cli_end_to_end(tmp_path, monkeypatch, capsys, inception, real_sqrtm):
    from dit_jax.cli import main

    monkeypatch.setattr(fid_module, "_sqrtm", _memoised_sqrtm() if real_sqrtm else _fast_sqrtm)
    weights, evaluator = inception
    rng = np.random.default_rng(10)
    samples = rng.integers(0, 256, (12, 64, 64, 3)).astype(np.uint8)  # one batch of 16 (8 devices), padded
    ref_images = np.clip(rng.normal(128, 40, (10, 64, 64, 3)), 0, 255).astype(np.uint8)
    # stored reference statistics that differ from what arr_0 would give, to see that they are the ones used
    ref_acts = evaluator.activations(ref_images)
    stored = (FIDStatistics(compute_statistics(ref_acts.pool).mu + 0.5, compute_statistics(ref_acts.pool).sigma),
              FIDStatistics(compute_statistics(ref_acts.spatial).mu - 0.5, compute_statistics(ref_acts.spatial).sigma))
    write_samples_npz(tmp_path / "samples.npz", samples)
    write_reference_npz(tmp_path / "ref.npz", ref_images, *stored)

    monkeypatch.setenv("DIT_JAX_INCEPTION_WEIGHTS", str(weights))  # the environment variable route
    made, real_from_file = [], Evaluator.from_file

    def spy(*args, **kwargs):
        made.append(real_from_file(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(Evaluator, "from_file", spy)
    rc = main(["evaluate", str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), "--batch-size", "256",
               "--json", str(tmp_path / "m.json"), "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert made[0].batch_size == 16  # 12 samples and 10 references are not padded to 256 (16: 8 devices)
    lines = out.out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    got = json.loads((tmp_path / "m.json").read_text())
    assert got["num_samples"] == 12 and got["num_reference"] == 10

    sample_acts = evaluator.activations(samples)
    sample_stats = (compute_statistics(sample_acts.pool), compute_statistics(sample_acts.spatial))
    want = compute_metrics(sample_acts, ref_acts, sample_stats, stored)
    assert want["inception_score"] == pytest.approx(inception_score_from_logits(sample_acts.logits))
    assert (want["precision"], want["recall"]) == pytest.approx(compute_prec_recall(ref_acts.pool, sample_acts.pool))
    for (key, name), line in zip([("inception_score", "Inception Score"), ("fid", "FID"), ("sfid", "sFID"),
                                  ("precision", "Precision"), ("recall", "Recall")], lines):
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
        assert float(line.split(": ")[1]) == got[key]
    assert 1.0 <= got["inception_score"] <= 12 and 0 <= got["precision"] <= 1 and 0 <= got["recall"] <= 1
    if not real_sqrtm:  # the stored statistics, not ones computed from arr_0, went into FID and sFID
        computed = compute_statistics(ref_acts.pool)
        assert got["fid"] != pytest.approx(sample_stats[0].frechet_distance(computed), rel=1e-6)
        # without stored statistics they are computed from arr_0 (ADM read_statistics)
        plain = write_samples_npz(tmp_path / "plain_ref.npz", ref_images)
        pool, spatial = evaluator.read_statistics(str(plain), ref_acts)
        np.testing.assert_array_equal(pool.sigma, computed.sigma)
        np.testing.assert_array_equal(spatial.mu, compute_statistics(ref_acts.spatial).mu)


def test_cli_errors(tmp_path, monkeypatch, capsys):
    from dit_jax.cli import main

    monkeypatch.delenv("DIT_JAX_INCEPTION_WEIGHTS", raising=False)
    good = write_samples_npz(tmp_path / "good.npz", np.zeros((4, 8, 8, 3), np.uint8))
    assert main(["evaluate", str(good), str(good)]) == 1
    err = capsys.readouterr().err
    assert "pt_inception-2015-12-05-6726825d.pth" in err and "github.com/mseitzer/pytorch-fid" in err
    assert "--inception-weights" in err and "$DIT_JAX_INCEPTION_WEIGHTS" in err

    assert main(["evaluate", str(good), str(good), "--inception-weights", str(tmp_path / "nope.pth")]) == 1
    assert "nope.pth" in capsys.readouterr().err

    assert main(["evaluate", str(tmp_path / "absent.npz"), str(good)]) == 1
    assert "absent.npz: no such file" in capsys.readouterr().err

    np.savez(tmp_path / "float.npz", np.zeros((4, 8, 8, 3), np.float32))
    assert main(["evaluate", str(good), str(tmp_path / "float.npz")]) == 1
    assert "uint8" in capsys.readouterr().err


def test_no_warnings_on_well_conditioned_fid():
    a = np.random.default_rng(11).normal(size=(300, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_statistics(a).frechet_distance(compute_statistics(a + 1))
