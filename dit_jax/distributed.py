"""Multi-process start: `jax.distributed.initialize()` before any other JAX call, wherever the job runs.

    dit-jax train ... --coordinator 10.0.0.2:8476 --num-processes 4 --process-id 1   # explicit (GPU cluster)
    JAX_COORDINATOR_ADDRESS=10.0.0.2:8476 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=1 dit-jax train ...   # the same
    dit-jax train ... --num-processes 4           # TPU pod slice / SLURM: JAX finds the coordinator and the id

Rules (`initialize(...)`, called by every multi-process-capable command before it touches JAX):
- A flag wins over its environment variable (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
- All three known: `jax.distributed.initialize(coordinator, n, i)`.
- Some or none known, and JAX's cluster detection recognises the environment (Cloud TPU VM slices, SLURM,
  Open MPI, GKE TPU, Kubernetes): `jax.distributed.initialize()` with what is known; JAX fills in the rest.
- Some known and no recognised environment: a DistributedError naming what is missing.
- Nothing known and no recognised environment: one process, nothing to initialise (a laptop, one GPU box).
- Afterwards the job must have the expected number of processes (`--num-processes` or JAX_NUM_PROCESSES when
  given): a pod worker that fails to join stops with an error instead of training alone on the shared workdir.

JAX's detection (jax._src.clusters) is the code `jax.distributed.initialize()` itself runs; we only ask it
whether an environment is present, so that a single-process machine is not asked for a coordinator.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("dit_jax.distributed")

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


class DistributedError(RuntimeError):
    """The multi-process start is misconfigured (a missing or bad setting, or the wrong number of processes)."""


@dataclass(frozen=True)
class Settings:
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.coordinator, self.num_processes, self.process_id))

    @property
    def complete(self) -> bool:
        return all(v is not None for v in (self.coordinator, self.num_processes, self.process_id))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The multi-process flags every command that can run on several processes takes."""
    g = parser.add_argument_group(
        "multi-process (a TPU pod, a GPU cluster, or launch/local/multiprocess.sh)",
        "Detected on Cloud TPU VMs and under SLURM; elsewhere give all three (or the JAX_* variables).")
    g.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                   help=f"process 0's address and a free port (env {ENV_COORDINATOR})")
    g.add_argument("--num-processes", type=int, metavar="N", default=None,
                   help=f"number of processes in the job (env {ENV_NUM_PROCESSES})")
    g.add_argument("--process-id", type=int, metavar="I", default=None,
                   help=f"this process's index, 0 .. N-1 (env {ENV_PROCESS_ID})")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not an integer") from None


def resolve(coordinator: str | None = None, num_processes: int | None = None,
            process_id: int | None = None) -> Settings:
    """Flags over environment variables, checked for consistency (no JAX call)."""
    s = Settings(
        coordinator=coordinator or os.environ.get(ENV_COORDINATOR, "").strip() or None,
        num_processes=num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES),
        process_id=process_id if process_id is not None else _env_int(ENV_PROCESS_ID),
    )
    if s.coordinator is not None:
        host, sep, port = s.coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise DistributedError(f"--coordinator / {ENV_COORDINATOR} must be HOST:PORT, got {s.coordinator!r}")
    if s.num_processes is not None and s.num_processes < 1:
        raise DistributedError(f"--num-processes / {ENV_NUM_PROCESSES} must be >= 1, got {s.num_processes}")
    if s.process_id is not None:
        if s.process_id < 0:
            raise DistributedError(f"--process-id / {ENV_PROCESS_ID} must be >= 0, got {s.process_id}")
        if s.num_processes is not None and s.process_id >= s.num_processes:
            raise DistributedError(f"--process-id {s.process_id} is not below --num-processes {s.num_processes}")
    return s


def detected_cluster() -> str | None:
    """The name of the cluster environment JAX's auto-detection would use here (None: none recognised)."""
    try:
        from jax._src import clusters  # JAX's own detection, run by jax.distributed.initialize()
    except ImportError:  # pragma: no cover - a JAX without it: only explicit settings work
        return None
    for env in clusters.ClusterEnv._cluster_types:  # noqa: SLF001
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            if env.is_env_present():
                return env.__name__
        except Exception as e:  # noqa: BLE001  (a probe that fails means: not this environment)
            log.debug("cluster probe %s failed: %r", env.__name__, e)
    return None


def _missing(s: Settings) -> str:
    names = [(s.coordinator, f"--coordinator HOST:PORT ({ENV_COORDINATOR})"),
             (s.num_processes, f"--num-processes N ({ENV_NUM_PROCESSES})"),
             (s.process_id, f"--process-id I ({ENV_PROCESS_ID})")]
    return ", ".join(label for value, label in names if value is None)


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> Settings:
    """Start the multi-process job if there is one (see the module docstring). Call before any JAX call.

    Returns the resolved settings. Raises DistributedError when only part of an explicit set-up is given
    outside a recognised cluster, or when the job has another number of processes than expected.
    """
    import jax

    s = resolve(coordinator, num_processes, process_id)
    if jax.distributed.is_initialized():
        _check_count(s)
        return s
    single = s.num_processes == 1 and s.coordinator is None and s.process_id in (None, 0)
    cluster = None if s.complete or single else detected_cluster()
    if s.complete:
        pass
    elif cluster is not None:
        log.info("multi-process environment detected (%s)", cluster)
    elif s.any and not single:
        raise DistributedError(
            "an explicit multi-process start needs all of --coordinator, --num-processes and --process-id (or "
            f"their JAX_* variables), and no cluster JAX can detect (TPU VM, SLURM) was found; missing: "
            f"{_missing(s)}")
    else:
        return s  # one process
    try:
        jax.distributed.initialize(s.coordinator, s.num_processes, s.process_id)
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise DistributedError(f"the multi-process start came after a JAX call in this process: {e}") from e
        raise DistributedError(f"jax.distributed.initialize failed: {e}") from e
    _check_count(s)
    log.info("process %d of %d (%d local devices, %d in all)", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return s


def _check_count(s: Settings) -> None:
    import jax

    if s.num_processes is not None and jax.process_count() != s.num_processes:
        raise DistributedError(
            f"expected a job of {s.num_processes} processes but this process is in one of {jax.process_count()}: "
            "check that every host runs the same command (on a TPU pod: --worker=all)")


def from_args(args: argparse.Namespace) -> Settings:
    """initialize() with the flags add_arguments() defined."""
    return initialize(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                      getattr(args, "process_id", None))


def process_tag() -> str:
    """'[p1/4] ' in a multi-process job, '' with one process: the prefix of every process's own log lines."""
    import jax

    n = jax.process_count()
    return f"[p{jax.process_index()}/{n}] " if n > 1 else ""


# ----------------------------------------------------------------------------------------------------------------
# Waiting for the other processes of a job (sample-fid, extract-latents, evaluate, the checkpointer's restore).
# ----------------------------------------------------------------------------------------------------------------
# Through the job's key-value store (jax.distributed's coordination service), not device collectives: a process
# may wait for hours (its peers sample or encode more shards), with no collective timeout and nothing to
# compile. A process that dies ends the wait: the coordination service terminates the job.
POLL_MS = 600_000
_uses: dict[str, int] = {}


def job_key(name: str) -> str:
    """`name` made unique for this use: every process calls the same synchronisation points in the same order, so
    the n-th use of a name gets the same key everywhere (a key can be set only once per job)."""
    n = _uses[name] = _uses.get(name, -1) + 1
    return f"{name}/{n}"


def _client() -> Any:
    from jax._src import distributed as jax_distributed  # the client jax.distributed.initialize() started

    return jax_distributed.global_state.client


def publish(key: str, value: str) -> None:
    """Set `key` (once per job) in the job's key-value store."""
    client = _client()
    if client is not None:
        client.key_value_set(key, value)


def wait_for(key: str) -> str:
    """The value of `key` once a process of the job has set it; no time limit."""
    client = _client()
    if client is None:  # pragma: no cover - several processes without jax.distributed.initialize()
        raise RuntimeError("several processes but no jax.distributed client to wait on")
    while True:
        try:
            return str(client.blocking_key_value_get(key, POLL_MS))
        except RuntimeError as e:  # jax.errors.JaxRuntimeError
            if "DEADLINE_EXCEEDED" not in str(e):
                raise


def all_agree(name: str, ok: bool) -> bool:
    """True when `ok` holds on every process; returns when every process has called it with this `name` (a
    barrier: every process must make the same calls in the same order). One process: `ok`."""
    import jax

    if jax.process_count() == 1:
        return ok
    key = job_key(name)
    publish(f"{key}/{jax.process_index()}", "1" if ok else "0")
    return all([wait_for(f"{key}/{i}") == "1" for i in range(jax.process_count())])


def on_process_0(name: str, work: Callable[[], Any],
                 succeeded: Callable[[Any], bool] = lambda result: True) -> tuple[bool, Any]:
    """Run `work()` on process 0 only; the others wait until it has finished. -> (it succeeded: returned a result
    that `succeeded` accepts, its result on process 0, else None). An exception on process 0 is re-raised there
    after the others learn of it.

    The others wait instead of exiting at once: a process that ends minutes before the rest makes JAX's shutdown
    barrier time out (after 5 minutes), and the coordination service then ends the whole job, process 0's work
    included. One process: work() as it is."""
    import jax

    if jax.process_count() == 1:
        result = work()
        return succeeded(result), result
    key = job_key(name)
    if jax.process_index() != 0:
        return wait_for(key) == "ok", None
    outcome = "failed"
    try:
        result = work()
        outcome = "ok" if succeeded(result) else "failed"
    finally:  # also on an unexpected exception: the others must not wait forever
        publish(key, outcome)
    return outcome == "ok", result
