"""Tests for dit_jax.diffusion.sharing: DDT encoder-sharing schedules (uniform and DP-optimal)."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest

from dit_jax.diffusion.sharing import (
    dp_schedule,
    error_map,
    load_schedule,
    recompute_mask,
    save_schedule,
    schedule_cost,
    state_similarity,
    uniform_schedule,
)

# ----------------------------------------------------------------------------------------------------
# independent references


def reference_sharing_dp(sim: np.ndarray, num_recompute: int) -> tuple[list[int], float]:
    """Transcription of the Python loops of MCG-NJU/DDT sharing_sampling.py `sharing_dp` (after `sim`).

    Returns (schedule, optimal cost C[K][N]).
    """
    num_steps = sim.shape[0]
    error = (1 - sim).tolist()
    for i in range(1, num_steps):
        for j in range(0, i):
            error[i][j] = error[i - 1][j] + error[i][j]
    C = [[0.0] * (num_steps + 1) for _ in range(num_recompute + 1)]
    P = [[-1] * (num_steps + 1) for _ in range(num_recompute + 1)]
    for i in range(1, num_steps + 1):
        C[1][i] = error[i - 1][0]
        P[1][i] = 0
    for step in range(2, num_recompute + 1):
        for i in range(step, num_steps + 1):
            min_value = 99999
            min_index = -1
            for j in range(step - 1, i):
                value = C[step - 1][j] + error[i - 1][j]
                if value < min_value:
                    min_value = value
                    min_index = j
            C[step][i] = min_value
            P[step][i] = min_index
    timesteps = [num_steps]
    for i in range(num_recompute, 0, -1):
        timesteps.append(P[i][timesteps[-1]])
    timesteps.reverse()
    return timesteps[:-1], C[num_recompute][num_steps]


def direct_cost(sim: np.ndarray, starts: tuple[int, ...]) -> float:
    """Cost straight from the definition: sum over segments [s, e] of sum_{k=s..e} (1 - sim[k, s])."""
    n = sim.shape[0]
    ends = [s - 1 for s in starts[1:]] + [n - 1]
    return float(sum(1.0 - sim[k, s] for s, e in zip(starts, ends) for k in range(s, e + 1)))


def all_schedules(n: int, k: int):
    for rest in itertools.combinations(range(1, n), k - 1):
        yield (0, *rest)


def random_sim(rng: np.random.Generator, n: int, symmetric: bool) -> np.ndarray:
    sim = rng.uniform(-1.0, 1.0, size=(n, n))
    if symmetric:
        sim = (sim + sim.T) / 2
        np.fill_diagonal(sim, 1.0)
    return sim


def sim_from_states(rng: np.random.Generator, n: int) -> np.ndarray:
    """A realistic similarity: slowly drifting random states (N, B=2, L=5, C=4)."""
    states = np.cumsum(rng.normal(size=(n, 2, 5, 4)) * 0.3, axis=0) + rng.normal(size=(1, 2, 5, 4))
    return state_similarity(states)


# ----------------------------------------------------------------------------------------------------
# dp_schedule


@pytest.mark.parametrize("n", range(2, 10))
def test_dp_matches_brute_force(n):
    rng = np.random.default_rng(100 + n)
    sims = [random_sim(rng, n, symmetric=True) for _ in range(12)]
    sims += [random_sim(rng, n, symmetric=False) for _ in range(12)]
    sims += [sim_from_states(rng, n) for _ in range(6)]
    unique_checked = 0
    for sim in sims:
        for k in range(1, n + 1):
            got = dp_schedule(sim, k)
            assert len(got) == k and got[0] == 0 and got == sorted(set(got)) and got[-1] < n
            costs = sorted((direct_cost(sim, s), s) for s in all_schedules(n, k))
            best_cost, best = costs[0]
            assert schedule_cost(sim, got) == pytest.approx(best_cost, abs=1e-12)
            assert direct_cost(sim, tuple(got)) == pytest.approx(best_cost, abs=1e-12)
            if len(costs) == 1 or costs[1][0] > best_cost + 1e-9:
                assert got == list(best)
                unique_checked += 1
    assert unique_checked > 0


@pytest.mark.parametrize("n", [2, 3, 5, 8, 13, 20])
def test_dp_matches_reference_transcription(n):
    rng = np.random.default_rng(7 * n)
    for trial in range(6):
        sim = random_sim(rng, n, symmetric=trial % 2 == 0) if trial < 4 else sim_from_states(rng, n)
        for k in range(1, n + 1):
            ref_schedule, ref_cost = reference_sharing_dp(sim, k)
            assert dp_schedule(sim, k) == ref_schedule
            # summed in the same order as the reference: bit-identical cost
            assert schedule_cost(sim, ref_schedule) == ref_cost


def test_dp_ties_earliest_last_start():
    # N = 4, K = 2: starts 2 and 3 both cost 1, start 1 costs 2; the reference keeps the smaller.
    sim = np.ones((4, 4))
    sim[2, 0] = sim[3, 0] = sim[3, 2] = 0.0
    sim[3, 1] = -1.0
    assert [schedule_cost(sim, [0, s]) for s in (1, 2, 3)] == [2.0, 1.0, 1.0]
    assert dp_schedule(sim, 2) == [0, 2]
    # K = 3: {0,1,3} and {0,2,3} both cost 0; same last start, so the earlier second-to-last wins.
    assert schedule_cost(sim, [0, 1, 3]) == schedule_cost(sim, [0, 2, 3]) == 0.0
    assert dp_schedule(sim, 3) == [0, 1, 3]
    for k in (2, 3):
        assert dp_schedule(sim, k) == reference_sharing_dp(sim, k)[0]


def test_dp_all_ties_gives_earliest_steps():
    for sim in (np.ones((6, 6)), np.full((6, 6), 0.5) + np.eye(6) * 0.5):
        for k in range(1, 7):
            assert dp_schedule(sim, k) == list(range(k))


@pytest.mark.parametrize("n", range(2, 8))
def test_dp_ties_on_exact_quarter_grid(n):
    # Entries are multiples of 1/4, so every cost is exact in float64 and ties are real ties. Documented
    # rule: among optimal schedules, the minimum in reverse-lexicographic order (earliest last start...).
    rng = np.random.default_rng(n)
    for _ in range(10):
        sim = rng.integers(-4, 5, size=(n, n)) / 4.0
        for k in range(1, n + 1):
            costs = {s: direct_cost(sim, s) for s in all_schedules(n, k)}
            best = min(costs.values())
            expected = min((s for s, c in costs.items() if c == best), key=lambda s: s[::-1])
            assert dp_schedule(sim, k) == list(expected)
            assert dp_schedule(sim, k) == reference_sharing_dp(sim, k)[0]


def test_dp_deterministic_and_input_untouched():
    rng = np.random.default_rng(0)
    sim = random_sim(rng, 12, symmetric=True)
    copy = sim.copy()
    assert dp_schedule(sim, 5) == dp_schedule(sim, 5)
    assert dp_schedule(sim.tolist(), 5) == dp_schedule(sim, 5)
    np.testing.assert_array_equal(sim, copy)


def test_dp_k_extremes():
    rng = np.random.default_rng(1)
    for n in (1, 2, 7):
        sim = random_sim(rng, n, symmetric=True)
        assert dp_schedule(sim, 1) == [0]
        assert dp_schedule(sim, n) == list(range(n))


def test_dp_beats_uniform():
    rng = np.random.default_rng(3)
    sim = sim_from_states(rng, 24)
    for r in (2, 3, 4, 6):
        uni = uniform_schedule(24, r)
        dp = dp_schedule(sim, len(uni))
        assert schedule_cost(sim, dp) <= schedule_cost(sim, uni) + 1e-12


def test_dp_bad_inputs():
    sim = np.eye(4)
    with pytest.raises(ValueError, match=r"num_recompute must be in \[1, 4\]"):
        dp_schedule(sim, 5)
    with pytest.raises(ValueError, match="num_recompute must be >= 1"):
        dp_schedule(sim, 0)
    with pytest.raises(ValueError, match="num_recompute must be an integer"):
        dp_schedule(sim, 2.0)
    with pytest.raises(ValueError, match="num_recompute must be an integer"):
        dp_schedule(sim, True)
    with pytest.raises(ValueError, match="square"):
        dp_schedule(np.ones((3, 4)), 2)
    with pytest.raises(ValueError, match="square"):
        dp_schedule(np.ones((2, 2, 2)), 1)
    with pytest.raises(ValueError, match="empty"):
        dp_schedule(np.ones((0, 0)), 1)
    bad = np.eye(4)
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        dp_schedule(bad, 2)
    with pytest.raises(ValueError, match="NaN"):
        error_map(bad)


# ----------------------------------------------------------------------------------------------------
# error_map, schedule_cost, recompute_mask, uniform_schedule


def test_error_map_definition():
    rng = np.random.default_rng(5)
    sim = random_sim(rng, 6, symmetric=False)
    err = error_map(sim)
    assert err.shape == (6, 6) and err.dtype == np.float64
    for i in range(6):
        for j in range(6):
            if j > i:
                assert err[i, j] == np.inf
            else:
                assert err[i, j] == pytest.approx(sum(1 - sim[k, j] for k in range(j, i + 1)), abs=1e-12)


def test_schedule_cost_hand_cases():
    sim = np.ones((4, 4))
    sim[2, 0] = sim[3, 0] = sim[3, 2] = 0.0
    sim[3, 1] = -1.0
    assert schedule_cost(sim, [0]) == 2.0  # (1-1) + (1-1) + (1-0) + (1-0)
    assert schedule_cost(sim, [0, 1]) == 2.0  # [0,0] + [1,3]: 0 + (0 + 0 + 2)
    assert schedule_cost(sim, [0, 1, 2, 3]) == 0.0
    assert schedule_cost(sim, np.array([0, 2])) == 1.0
    assert isinstance(schedule_cost(sim, [0, 2]), float)


@pytest.mark.parametrize(
    "schedule, match",
    [
        ([], "empty"),
        ([1, 2], "start at step 0"),
        ([0, 2, 1], "strictly increasing"),
        ([0, 2, 2], "strictly increasing"),
        ([0, 4], "out of range for 4 steps"),
        ([0, 1.5], "must be an integer"),
        ([0, -1], ">= 0"),
        ("01", "sequence of step indices"),
    ],
)
def test_bad_schedules(schedule, match):
    with pytest.raises(ValueError, match=match):
        schedule_cost(np.eye(4), schedule)
    with pytest.raises(ValueError, match=match):
        recompute_mask(schedule, 4)


def test_recompute_mask():
    np.testing.assert_array_equal(recompute_mask([0, 2], 4), [True, False, True, False])
    np.testing.assert_array_equal(recompute_mask([0], 3), [True, False, False])
    np.testing.assert_array_equal(recompute_mask(range(5), 5), np.ones(5, bool))
    mask = recompute_mask(uniform_schedule(10, 3), 10)
    assert mask.dtype == np.bool_ and mask.shape == (10,)
    assert np.flatnonzero(mask).tolist() == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        recompute_mask([0], 0)


def test_uniform_schedule():
    assert uniform_schedule(10, 1) == list(range(10))
    assert uniform_schedule(10, 3) == [0, 3, 6, 9]
    assert uniform_schedule(10, 5) == [0, 5]
    assert uniform_schedule(10, 10) == [0]
    assert uniform_schedule(10, 25) == [0]
    assert uniform_schedule(1, 1) == [0]
    with pytest.raises(ValueError, match="num_steps"):
        uniform_schedule(0, 1)
    with pytest.raises(ValueError, match="refresh_every"):
        uniform_schedule(10, 0)
    with pytest.raises(ValueError, match="refresh_every must be an integer"):
        uniform_schedule(10, 2.5)


# ----------------------------------------------------------------------------------------------------
# state_similarity


def test_similarity_identical_states_all_ones():
    rng = np.random.default_rng(0)
    step = rng.normal(size=(2, 3, 8))
    sim = state_similarity(np.stack([step] * 5))
    assert sim.shape == (5, 5) and sim.dtype == np.float64
    np.testing.assert_allclose(sim, np.ones((5, 5)), atol=1e-12)
    # cosine similarity ignores per-token positive scaling
    scaled = np.stack([step * s for s in (1.0, 2.0, 1e-3)])
    np.testing.assert_allclose(state_similarity(scaled), np.ones((3, 3)), atol=1e-12)


def test_similarity_orthogonal_and_opposite():
    e1, e2 = np.array([1.0, 0.0]), np.array([0.0, 3.0])
    np.testing.assert_allclose(state_similarity(np.stack([e1, e2])[:, None, :]), np.eye(2), atol=1e-15)
    np.testing.assert_allclose(state_similarity(np.stack([e1, -e1])[:, None, :]), [[1, -1], [-1, 1]])
    # two tokens: one unchanged, one rotated by 90 degrees -> mean cosine 0.5
    states = np.array([[e1, e1], [e1, e2]])  # (N=2, T=2, C=2)
    np.testing.assert_allclose(state_similarity(states), [[1, 0.5], [0.5, 1]], atol=1e-15)


def test_similarity_layouts_agree_and_match_torch():
    rng = np.random.default_rng(1)
    states = rng.normal(size=(6, 3, 4, 5)).astype(np.float32)
    sim4 = state_similarity(states)
    sim3 = state_similarity(states.reshape(6, 12, 5))
    np.testing.assert_allclose(sim4, sim3, atol=1e-14)
    np.testing.assert_allclose(sim4, sim4.T, atol=1e-14)
    torch = pytest.importorskip("torch")
    # the reference's computation: (B*L, N, C), F.normalize, bmm, mean over tokens
    t = torch.from_numpy(states.astype(np.float64)).reshape(6, 12, 5).permute(1, 0, 2)
    t = torch.nn.functional.normalize(t, dim=-1)
    ref = torch.bmm(t, t.transpose(1, 2)).mean(dim=0).numpy()
    np.testing.assert_allclose(sim4, ref, atol=1e-12)


def test_similarity_zero_vector_no_nan():
    states = np.ones((3, 2, 4))
    states[1, 0] = 0.0  # step 1, token 0 is the zero vector
    sim = state_similarity(states)
    assert np.all(np.isfinite(sim))
    np.testing.assert_allclose(sim, [[1, 0.5, 1], [0.5, 0.5, 0.5], [1, 0.5, 1]], atol=1e-15)
    assert np.all(np.isfinite(state_similarity(np.zeros((2, 3, 4)))))
    dp_schedule(sim, 2)  # usable downstream


def test_similarity_bad_inputs():
    with pytest.raises(ValueError, match=r"\(N, B, L, C\) or \(N, T, C\)"):
        state_similarity(np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"\(N, B, L, C\) or \(N, T, C\)"):
        state_similarity(np.ones((1, 2, 3, 4, 5)))
    with pytest.raises(ValueError, match="non-empty"):
        state_similarity(np.ones((0, 2, 3)))
    bad = np.ones((2, 3, 4))
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        state_similarity(bad)


# ----------------------------------------------------------------------------------------------------
# save / load


def test_save_load_round_trip(tmp_path):
    path = tmp_path / "sched.json"
    save_schedule(path, [0, 3, np.int64(7)], num_steps=10, num_recompute=3, method="dp")
    schedule, meta = load_schedule(path)
    assert schedule == [0, 3, 7] and all(type(s) is int for s in schedule)
    assert meta == {"num_steps": 10, "num_recompute": 3, "method": "dp"}
    assert os.listdir(tmp_path) == ["sched.json"]  # no temporary file left behind
    # overwrite in place, string path, no meta
    save_schedule(str(path), [0])
    assert load_schedule(str(path)) == ([0], {})
    # nested folder is created
    nested = tmp_path / "a" / "b" / "s.json"
    save_schedule(nested, uniform_schedule(8, 2), num_steps=8)
    assert load_schedule(nested)[0] == [0, 2, 4, 6]


def test_save_rejects_bad_input(tmp_path):
    path = tmp_path / "s.json"
    with pytest.raises(ValueError, match="start at step 0"):
        save_schedule(path, [1, 2])
    with pytest.raises(ValueError, match="out of range for 5 steps"):
        save_schedule(path, [0, 5], num_steps=5)
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        save_schedule(path, [0, 1], blob=object())
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "bad JSON"),
        ("", "bad JSON"),
        ("[0, 1, 2]", "not a schedule file"),
        (json.dumps({"format": "something-else", "version": 1, "schedule": [0]}), "not a schedule file"),
        (json.dumps({"format": "dit-jax/ddt-sharing-schedule", "version": 99, "schedule": [0]}), "version"),
        (json.dumps({"format": "dit-jax/ddt-sharing-schedule", "version": 1, "schedule": "0"}), "JSON list"),
        (json.dumps({"format": "dit-jax/ddt-sharing-schedule", "version": 1, "schedule": [0, 0]}), "increasing"),
        (
            json.dumps(
                {"format": "dit-jax/ddt-sharing-schedule", "version": 1, "schedule": [0, 9], "meta": {"num_steps": 4}}
            ),
            "out of range",
        ),
        (json.dumps({"format": "dit-jax/ddt-sharing-schedule", "version": 1, "schedule": [0], "meta": []}), "meta"),
    ],
)
def test_load_corrupt_file(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        load_schedule(path)
    assert str(path) in str(info.value)


def test_load_truncated_file(tmp_path):
    path = tmp_path / "s.json"
    save_schedule(path, [0, 2, 5], num_steps=8)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="not a valid schedule file") as info:
        load_schedule(path)
    assert str(path) in str(info.value)
