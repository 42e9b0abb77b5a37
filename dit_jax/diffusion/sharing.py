"""Encoder-sharing schedules for DDT sampling (Wang et al. 2025, "Decoupled Diffusion Transformer").

A DDT sampler with N steps runs its condition encoder only on *recompute* steps; on the other steps it
reuses the encoder output (the "state": one vector per token) of the last recompute step. A *schedule*
is the sorted list of recompute steps; it always starts with step 0 (there is nothing to reuse yet).

Maths (following MCG-NJU/DDT, src/diffusion/stateful_flow_matching/sharing_sampling.py, `sharing_dp`):

* Similarity. Given the states s_n[m] of a full sampling run (step n = 0..N-1, token m = 1..M, with
  M = B*L tokens over a batch), sim[i, j] = (1/M) sum_m <s_i[m]/|s_i[m]|, s_j[m]/|s_j[m]|>, the mean
  cosine similarity of the two steps' states (a zero vector normalises to zero).
* Segment cost. Computing the state at step j and reusing it on steps j..i costs
      err[i, j] = sum_{k=j..i} (1 - sim[k, j])        (j <= i; +inf for j > i).
  The k = j term is 1 - sim[j, j] (zero for nonzero states).
* Schedule cost. A schedule 0 = t_1 < t_2 < ... < t_K cuts 0..N-1 into the contiguous segments
  [t_k, t_{k+1} - 1] (t_{K+1} = N) and costs sum_k err[t_{k+1} - 1, t_k].
* Optimal schedule. With D[k, i] the least cost of cutting steps 0..i-1 into k segments,
      D[1, i] = err[i-1, 0],    D[k, i] = min_{j = k-1..i-1} D[k-1, j] + err[i-1, j],
  and D[K, N] is the optimum; a trace-back of the argmins gives the schedule. This is O(K N^2).
  Ties: each argmin is the *smallest* minimising j (the reference scans j upward and keeps the first
  strict minimum), so among optimal schedules the result has the earliest last start, then the
  earliest second-to-last start, and so on (the minimum in reverse-lexicographic order). Sums are
  formed in the same order as the reference, so floating-point ties resolve identically too.

The DDT repo picks K = int(N / state_refresh_rate). Everything here is numpy, float64, deterministic.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from dit_jax.paths import write_text_atomic

SCHEDULE_FORMAT = "dit-jax/ddt-sharing-schedule"
SCHEDULE_VERSION = 1


# ----------------------------------------------------------------------------------------------------
# validation helpers


def _check_int(name: str, value: Any, minimum: int) -> int:
    """`value` as a Python int >= minimum, else ValueError (bools are rejected)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_sim(sim: Any) -> np.ndarray:
    """A finite, square, non-empty (N, N) float64 copy of `sim`."""
    arr = np.array(sim, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"similarity matrix must be square (N, N), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError("similarity matrix is empty (N = 0)")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"similarity matrix contains {np.count_nonzero(~np.isfinite(arr))} NaN/inf entries")
    return arr


def _check_schedule(schedule: Sequence[int], num_steps: int | None) -> list[int]:
    """`schedule` as a list of ints: non-empty, starts at 0, strictly increasing, below num_steps."""
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, (Sequence, np.ndarray)):
        raise ValueError(f"schedule must be a sequence of step indices, got {type(schedule).__name__}")
    steps = [_check_int(f"schedule[{n}]", s, 0) for n, s in enumerate(schedule)]
    if not steps:
        raise ValueError("schedule is empty; it must at least contain step 0")
    if steps[0] != 0:
        raise ValueError(f"schedule must start at step 0, got {steps}")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"schedule must be strictly increasing (sorted, no repeats), got {steps}")
    if num_steps is not None and steps[-1] >= num_steps:
        raise ValueError(f"schedule step {steps[-1]} is out of range for {num_steps} steps: {steps}")
    return steps


# ----------------------------------------------------------------------------------------------------
# schedules


def uniform_schedule(num_steps: int, refresh_every: int) -> list[int]:
    """Recompute every `refresh_every` steps: [0, r, 2r, ...] below num_steps (r = 1: every step)."""
    num_steps = _check_int("num_steps", num_steps, 1)
    refresh_every = _check_int("refresh_every", refresh_every, 1)
    return list(range(0, num_steps, refresh_every))


def state_similarity(states: Any) -> np.ndarray:
    """Mean cosine similarity between the encoder states of every pair of sampling steps.

    states: (N, B, L, C) (steps, batch, tokens, channels) or (N, T, C); any array-like (numpy, jax).
    Returns sim (N, N) float64, sim[i, j] = mean over the B*L (or T) tokens of cos(state_i, state_j)
    for that token. Vectors are normalised in float64; a zero vector normalises to zero (no NaN), so it
    has similarity 0 with everything, itself included.
    """
    arr = np.asarray(states, dtype=np.float64)
    if arr.ndim not in (3, 4):
        raise ValueError(f"states must have shape (N, B, L, C) or (N, T, C), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"states must be non-empty, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("states contain NaN or inf")
    n, c = arr.shape[0], arr.shape[-1]
    tokens = arr.reshape(n, -1, c)  # (N, M, C)
    norms = np.linalg.norm(tokens, axis=-1, keepdims=True)  # (N, M, 1)
    unit = np.divide(tokens, norms, out=np.zeros_like(tokens), where=norms > 0)
    flat = unit.reshape(n, -1)  # (N, M*C): one row-dot sums the M per-token cosines
    return (flat @ flat.T) / tokens.shape[1]


def error_map(sim: Any) -> np.ndarray:
    """Segment costs err (N, N): err[i, j] = sum_{k=j..i} (1 - sim[k, j]) for j <= i, +inf above.

    err[i, j] is the cost of computing the state at step j and reusing it through step i. The sum runs
    k = j, j+1, ..., i in that order, as in MCG-NJU/DDT `sharing_dp` (so floats match bit for bit).
    """
    base = 1.0 - _check_sim(sim)
    n = base.shape[0]
    err = np.full((n, n), np.inf)
    err[np.diag_indices(n)] = np.diag(base)
    for i in range(1, n):
        err[i, :i] = err[i - 1, :i] + base[i, :i]
    return err


def _dp_tables(err: np.ndarray, num_recompute: int) -> tuple[np.ndarray, np.ndarray]:
    """The DP of the module docstring: cost D and parent P, both (K+1, N+1), rows k = 1..K used.

    D[k, i] is the least cost of cutting steps 0..i-1 into k segments (+inf where impossible) and
    P[k, i] the start of the last of them (the smallest such start among ties; -1 where undefined).
    """
    n = err.shape[0]
    cost = np.full((num_recompute + 1, n + 1), np.inf)
    parent = np.full((num_recompute + 1, n + 1), -1, dtype=np.int64)
    cost[1, 1:] = err[:, 0]
    parent[1, 1:] = 0
    for k in range(2, num_recompute + 1):
        # cand[i-1, j] = D[k-1, j] + err[i-1, j]: +inf when j < k-1 (too few steps) or j > i-1.
        cand = cost[k - 1, :n][None, :] + err
        # First minimum = the reference's upward scan with a strict "<" (it starts from 99999 rather
        # than +inf, which differs only for costs >= 99999, beyond any cosine-similarity input).
        best = np.argmin(cand, axis=1)
        ends = np.arange(k, n + 1)  # i = k..N; rows i-1
        cost[k, ends] = cand[ends - 1, best[ends - 1]]
        parent[k, ends] = best[ends - 1]
    return cost, parent


def dp_schedule(sim: Any, num_recompute: int) -> list[int]:
    """The minimum-cost schedule with exactly `num_recompute` recompute steps (MCG-NJU/DDT `sharing_dp`).

    sim: (N, N) step similarity (see `state_similarity`); any finite values are accepted.
    num_recompute: K in [1, N]; K = 1 gives [0], K = N gives every step.
    Returns the K sorted segment starts (the first is 0). Ties: see the module docstring.
    """
    err = error_map(sim)
    n = err.shape[0]
    num_recompute = _check_int("num_recompute", num_recompute, 1)
    if num_recompute > n:
        raise ValueError(f"num_recompute must be in [1, {n}] for {n} steps, got {num_recompute}")
    _, parent = _dp_tables(err, num_recompute)
    starts = []
    end = n  # the segments found so far cover steps end..N-1
    for k in range(num_recompute, 0, -1):
        end = int(parent[k, end])
        starts.append(end)
    starts.reverse()
    return starts


def schedule_cost(sim: Any, schedule: Sequence[int]) -> float:
    """Total cost of `schedule` under `sim` (N, N): sum over its segments [t_k, t_{k+1}-1] of err.

    Summed left to right like the DP, so schedule_cost(sim, dp_schedule(sim, K)) is its optimum exactly.
    """
    err = error_map(sim)
    n = err.shape[0]
    starts = _check_schedule(schedule, n)
    ends = [s - 1 for s in starts[1:]] + [n - 1]
    total = 0.0
    for start, end in zip(starts, ends):
        total += float(err[end, start])
    return total


def recompute_mask(schedule: Sequence[int], num_steps: int) -> np.ndarray:
    """A bool (num_steps,) array, True on the recompute steps of `schedule` (for use in jax.lax.scan)."""
    num_steps = _check_int("num_steps", num_steps, 1)
    starts = _check_schedule(schedule, num_steps)
    mask = np.zeros(num_steps, dtype=bool)
    mask[starts] = True
    return mask


# ----------------------------------------------------------------------------------------------------
# files


def save_schedule(path: str | os.PathLike[str], schedule: Sequence[int], **meta: Any) -> None:
    """Write `schedule` and JSON-serialisable `meta` to a small JSON file at `path`, atomically.

    The file is written to a temporary file in the same folder and moved over `path` with os.replace,
    so readers never see a half-written file. If meta has an integer "num_steps", the schedule is
    checked against it (here and on load).
    """
    path = os.fspath(path)
    num_steps = meta.get("num_steps")
    steps = _check_schedule(schedule, _check_int("num_steps", num_steps, 1) if num_steps is not None else None)
    payload = {"format": SCHEDULE_FORMAT, "version": SCHEDULE_VERSION, "schedule": steps, "meta": meta}
    try:
        text = json.dumps(payload, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"schedule metadata for {path} is not JSON-serialisable: {e}") from e
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, text + "\n", fsync=True)


def load_schedule(path: str | os.PathLike[str]) -> tuple[list[int], dict[str, Any]]:
    """Read a file written by `save_schedule`: returns (schedule, meta).

    Raises ValueError naming `path` if the file is not valid JSON, not a schedule file of a known
    version, or holds an invalid schedule; FileNotFoundError if it does not exist.
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a valid schedule file (bad JSON: {e})") from e
    if not isinstance(payload, dict) or payload.get("format") != SCHEDULE_FORMAT:
        raise ValueError(f"{path}: not a schedule file (expected format {SCHEDULE_FORMAT!r})")
    if payload.get("version") != SCHEDULE_VERSION:
        raise ValueError(f"{path}: unsupported schedule file version {payload.get('version')!r}")
    meta = payload.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: 'meta' must be a JSON object, got {type(meta).__name__}")
    schedule = payload.get("schedule")
    if not isinstance(schedule, list):
        raise ValueError(f"{path}: 'schedule' must be a JSON list, got {type(schedule).__name__}")
    try:
        num_steps = meta.get("num_steps")
        steps = _check_schedule(schedule, _check_int("num_steps", num_steps, 1) if num_steps is not None else None)
    except ValueError as e:
        raise ValueError(f"{path}: invalid schedule: {e}") from e
    return steps, meta
