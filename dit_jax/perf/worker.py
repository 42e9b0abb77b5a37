"""The benchmark worker protocol: one process per contender, timed in interleaved windows (dit_jax.perf.bench runs
the workers; ours is dit_jax.perf.bench.serve, the PyTorch references bench/torch_reference.py's `serve`).

A worker builds and warms up its workload, says `ready`, then reads commands from stdin, one a line: `window N`
times N calls and says `window` with `seconds_per_call` and `cpu_s_per_call` (the process's CPU seconds: near the
core count when it had the machine, well below when something else ran); `quit` (or end of input) ends it, and it
says `done`. Saying is one stdout line: PROTOCOL_PREFIX, then a JSON object with "event".

Standard library only: the torch side imports this without importing jax.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any, Callable, Iterable

PROTOCOL_PREFIX = "@@bench "  # a protocol line on a worker's stdout: this prefix, then one JSON object
PARENT_ENV = "DIT_JAX_BENCH_PARENT"  # a worker's environment: the pid of the process that started it


def say(event: str, **fields: Any) -> None:
    """One protocol line: {"event": event, **fields}."""
    print(PROTOCOL_PREFIX + json.dumps(dict(event=event, **fields)), flush=True)


def window(run: Callable[[], Any], calls: int, *, guard: Callable[[], Any] | None = None,
           sync: Callable[[Any], Any] | None = None) -> dict[str, float]:
    """Wall and process-CPU seconds per call over `calls` consecutive calls of run(), under guard() (a context,
    e.g. JAX's transfer guard) and ended by sync(last output) (e.g. jax.block_until_ready; the torch side's run()
    synchronises itself)."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = None
    with guard() if guard is not None else contextlib.nullcontext():
        for _ in range(calls):
            out = run()
    if sync is not None:
        sync(out)
    return dict(seconds_per_call=(time.perf_counter() - t0) / calls, cpu_s_per_call=(time.process_time() - c0) / calls)


def serve_windows(run: Callable[[], Any], commands: Iterable[str] | None = None,
                  window_fn: Callable[[Callable[[], Any], int], dict[str, float]] = window) -> None:
    """The command loop after `ready`: `window N` -> a `window` line (window_fn(run, N)); `quit` or end of input
    returns. ValueError for anything else. commands: default stdin."""
    for line in commands if commands is not None else sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "quit":
            return
        if cmd[0] != "window" or len(cmd) != 2 or not cmd[1].isdigit() or int(cmd[1]) < 1:
            raise ValueError(f"unknown worker command {line.strip()!r}; expected 'window N' or 'quit'")
        say("window", **window_fn(run, int(cmd[1])))


def die_with_parent() -> None:
    """Called first thing in a worker: on Linux, be killed (SIGKILL) when the process that started it (the pid in
    $DIT_JAX_BENCH_PARENT) dies, however it dies, so that a killed `dit-jax bench` leaves no worker computing;
    exit at once if it is already gone. Elsewhere, or without the variable, a no-op (the worker then ends at its
    next read of the closed stdin)."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # it died before prctl
        os._exit(1)
