"""Test harness for multi-process jobs: dit_jax.multiprocess.run_job with a hard time limit, CPU devices, one XLA
compilation cache per process slot, and the output of every process in the failure message."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

from dit_jax.multiprocess import Job, run_job

REPO = Path(__file__).resolve().parents[1]
DIT_JAX = [sys.executable, "-m", "dit_jax.cli"]


def job_env(num_processes: int, extra: dict[str, str] | Sequence[dict[str, str]] | None = None) -> list[dict]:
    """One environment per process: this one, with its own compilation cache folder per process index (two
    processes must not write one cache at once; the same index of a later job reuses its compiled programs)."""
    extras = list(extra) if isinstance(extra, (list, tuple)) else [extra or {}] * num_processes
    envs = []
    for i in range(num_processes):
        env = dict(os.environ)
        cache = env.get("JAX_COMPILATION_CACHE_DIR")
        if cache:
            env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(cache, f"mp{num_processes}-p{i}")
        env.update(extras[i])
        envs.append(env)
    return envs


def run(argv: Sequence[str], num_processes: int, *, cpu_devices: int, timeout: float = 240, expect_ok: bool = True,
        extra_env: Any = None, **kw: Any) -> Job:
    """Run argv as an N-process job on `cpu_devices` CPU devices each; fail the test on a hang (timeout) and, with
    expect_ok, on any non-zero exit, showing every process's output."""
    job = run_job(list(argv), num_processes, cpu_devices=cpu_devices, timeout=timeout,
                  env=job_env(num_processes, extra_env), cwd=REPO, echo=None, **kw)
    if job.stopped_by == "timeout" or (expect_ok and not job.ok):
        dump = "\n".join(f"----- process {i} (exit {rc}) -----\n{job.text(i)[-6000:]}"
                         for i, rc in enumerate(job.returncodes))
        raise AssertionError(f"{num_processes}-process job {'timed out' if job.stopped_by == 'timeout' else 'failed'}"
                             f" after {job.seconds:.0f}s: {list(argv)}\n{dump}")
    return job


def single(argv: Sequence[str], *, cpu_devices: int, timeout: float = 240, env: dict | None = None) -> str:
    """Run argv as one plain process (no JAX_* job variables) on `cpu_devices` CPU devices; returns its output."""
    import subprocess

    from dit_jax.multiprocess import process_env

    e = process_env(0, 1, 0, cpu_devices, job_env(1, env)[0])
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        e.pop(k)
    r = subprocess.run(list(argv), env=e, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{list(argv)} exited {r.returncode}:\n{out[-6000:]}"
    return out
