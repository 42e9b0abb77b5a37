"""A pod on one machine: N local processes of one command, wired as a JAX multi-process job.

    launch/local/multiprocess.sh -n 2 --cpu-devices 4 -- dit-jax train --config configs/digits.py --workdir runs/mp
    python -m dit_jax.multiprocess -n 2 --cpu-devices 4 -- dit-jax train ...          # the same

Each process gets JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT (a free port), JAX_NUM_PROCESSES=N and
JAX_PROCESS_ID=i, which `dit-jax` reads before any JAX call (dit_jax/distributed.py), and, with --cpu-devices K,
JAX_PLATFORMS=cpu and JAX_NUM_CPU_DEVICES=K (K simulated CPU devices per process; cross-process collectives go
over gloo). Every output line is prefixed with "[pI] ". When a process fails (non-zero exit or a signal), the
others are stopped (SIGTERM, then SIGKILL after --grace seconds), so a dead peer never leaves the rest hanging
in a collective; --timeout bounds the whole job the same way. SIGINT/SIGTERM to the launcher are passed on to
every process (a preemption notice to the whole "pod"). The exit status is the first failure's (128 + signal
for a signal), or 0.

`run_job(...)` is the same launcher as a function (the multi-process tests use it): it returns each process's
exit status and output.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence, TextIO


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_env(i: int, n: int, port: int, cpu_devices: int | None, base: dict[str, str] | None = None) -> dict:
    """The environment of process i of n (on top of `base`, default os.environ)."""
    env = dict(os.environ if base is None else base)
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i),
               PYTHONUNBUFFERED="1")
    if cpu_devices:
        env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(cpu_devices))
        # an XLA_FLAGS device count would override JAX_NUM_CPU_DEVICES: leave the other XLA flags
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags)
    return env


@dataclass
class Job:
    """The outcome of run_job: exit status per process (negative: killed by that signal), output lines."""
    returncodes: list[int]
    output: list[list[str]] = field(default_factory=list)
    stopped_by: str | None = None  # "failure of process I", "timeout" or None (all ended by themselves)
    seconds: float = 0.0
    first_failure: int | None = None  # the process whose failure stopped the others

    @property
    def ok(self) -> bool:
        return all(rc == 0 for rc in self.returncodes)

    def text(self, i: int) -> str:
        return "".join(self.output[i])

    @property
    def exit_status(self) -> int:
        """The first failure's exit status (128 + N for signal N), else the first non-zero one, else 0."""
        order = ([self.first_failure] if self.first_failure is not None else []) + list(range(len(self.returncodes)))
        for i in order:
            rc = self.returncodes[i]
            if rc:
                return 128 - rc if rc < 0 else rc
        return 0


def run_job(
    argv: Sequence[str],
    num_processes: int,
    *,
    cpu_devices: int | None = None,
    timeout: float | None = None,
    grace: float = 20.0,
    env: dict[str, str] | Sequence[dict[str, str]] | None = None,
    cwd: str | os.PathLike | None = None,
    echo: TextIO | None = sys.stdout,
    on_line: Callable[[int, str, Callable[[int, int], None]], None] | None = None,
) -> Job:
    """Run `argv` as processes 0..N-1 of one job and wait for all of them (see the module docstring).

    env: the base environment (one dict for all, or one per process). echo: where the prefixed lines go (None:
    nowhere). on_line(i, line, send): called for every output line of process i, in the reader thread of that
    process; send(j, signum) signals process j (tests inject faults this way). Returns a Job.
    """
    n = int(num_processes)
    if n < 1:
        raise ValueError(f"num_processes must be >= 1, got {n}")
    port = free_port()
    bases = list(env) if isinstance(env, (list, tuple)) else [env] * n
    procs: list[subprocess.Popen] = []
    output: list[list[str]] = [[] for _ in range(n)]
    lock = threading.Lock()
    state: dict = {"by": None, "first": None}
    t0 = time.monotonic()

    def send(j: int, signum: int) -> None:
        p = procs[j]
        if p.poll() is None:
            try:
                os.killpg(p.pid, signum)
            except ProcessLookupError:
                pass

    def stop_all(reason: str) -> None:
        with lock:
            if state["by"] is None:
                state["by"] = reason
        for j in range(len(procs)):
            send(j, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for j, p in enumerate(procs):
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                send(j, signal.SIGKILL)
        for p in procs:
            p.wait()

    def reader(i: int) -> None:
        for line in procs[i].stdout:
            output[i].append(line)
            if echo is not None:
                with lock:
                    echo.write(f"[p{i}] {line}" if line.endswith("\n") else f"[p{i}] {line}\n")
                    echo.flush()
            if on_line is not None:
                on_line(i, line, send)

    for i in range(n):
        procs.append(subprocess.Popen(
            list(argv), env=process_env(i, n, port, cpu_devices, bases[i]), cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, errors="replace",
            start_new_session=True,  # its own process group: a stop reaches its children (grain workers) too
        ))
    readers = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(n)]
    for t in readers:
        t.start()

    def forward(signum: int, frame: object) -> None:
        for j in range(n):
            send(j, signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, forward)
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [i for i, rc in enumerate(codes) if rc not in (None, 0)]
            if bad:
                state["first"] = bad[0]
                stop_all(f"failure of process {bad[0]}")
                break
            if all(rc is not None for rc in codes):
                break
            if timeout is not None and time.monotonic() - t0 > timeout:
                stop_all("timeout")
                break
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for p in procs:  # nothing outlives the launcher
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for t in readers:
        t.join(timeout=5)
    return Job([p.returncode for p in procs], output, state["by"], time.monotonic() - t0, state["first"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launch/local/multiprocess.sh",
        description="Simulate a pod on this machine: N processes of COMMAND as one JAX multi-process job.",
        epilog="example: launch/local/multiprocess.sh -n 2 --cpu-devices 4 -- dit-jax train "
               "--config configs/digits.py:runlocal=True --workdir runs/mp",
    )
    parser.add_argument("-n", "--num-processes", type=int, default=2, help="number of processes (default 2)")
    parser.add_argument("--cpu-devices", type=int, default=None, metavar="K",
                        help="simulated CPU devices per process (JAX_PLATFORMS=cpu); default: the real devices")
    parser.add_argument("--timeout", type=float, default=None, metavar="S", help="stop every process after S seconds")
    parser.add_argument("--grace", type=float, default=20.0, metavar="S",
                        help="seconds between SIGTERM and SIGKILL when stopping the others (default 20)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    if args.num_processes < 1:
        parser.error("-n must be >= 1")
    job = run_job(command, args.num_processes, cpu_devices=args.cpu_devices, timeout=args.timeout, grace=args.grace)
    if job.stopped_by:
        print(f"multiprocess: stopped every process after the {job.stopped_by}; exit codes {job.returncodes}",
              file=sys.stderr)
    return job.exit_status


if __name__ == "__main__":
    sys.exit(main())
