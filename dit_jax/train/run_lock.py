"""One trainer per run: the lock file `<workdir>/dit_jax.lock`, held by the running trainer (process 0 on a pod).

The file is JSON naming its owner: {"host", "pid", "started" (UTC, ISO 8601), "heartbeat" (Unix time, renewed
every `heartbeat_s` by a background thread), "token" (unique to this trainer), "workdir"}. A second trainer on the
same workdir refuses to start with a message naming the owner; readers (`dit-jax sample --ckpt`, export, ...)
never look at it, since they never write.

Whether the owner is alive:
- local workdirs (and NFS, which honours POSIX locks): the owner also holds `fcntl.flock` on the file. The kernel
  releases it when the owner dies, whatever killed it (SIGKILL, OOM), so a lock whose flock can be taken is left
  by a dead job and is taken over with a warning. On another host's file system that might not share flock, an
  owner on another host whose heartbeat is fresher than `stale_after_s` still counts as alive.
- gs:// (and other object stores, which have no locks): the owner on this host is alive while its pid runs (and
  was started when the lock says); an owner on another host is alive while its heartbeat is fresher than
  `stale_after_s`. A lock is created by write-then-read-back (the last writer wins, and the loser sees another
  token and refuses): two trainers started on different hosts within the same second could both read back
  their own token before the other's write lands; everything else is refused.

A trainer that finds its lock taken over (its heartbeat found another token: it was presumed dead, e.g. during a
long storage outage) sets `lost`; the trainer stops at its next checkpoint instead of writing into a run that
another trainer now owns.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from etils import epath

from dit_jax.errors import warn

log = logging.getLogger("dit_jax.train.run_lock")

LOCK_NAME = "dit_jax.lock"
HEARTBEAT_S = float(os.environ.get("DIT_JAX_LOCK_HEARTBEAT_S", "30"))
STALE_AFTER_S = float(os.environ.get("DIT_JAX_LOCK_STALE_S", "300"))  # ten missed heartbeats


class RunLockedError(RuntimeError):
    """Another trainer holds the run's lock (the message names it), or this trainer lost the lock."""


@dataclasses.dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    started: str
    heartbeat: float
    token: str
    workdir: str = ""

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        return (f"pid {self.pid} on host {self.host}, started {self.started}, last heartbeat "
                f"{_age(age)} ago")

    @classmethod
    def parse(cls, text: str) -> "Owner | None":
        try:
            d = json.loads(text)
            return cls(host=str(d["host"]), pid=int(d["pid"]), started=str(d["started"]),
                       heartbeat=float(d["heartbeat"]), token=str(d["token"]), workdir=str(d.get("workdir", "")))
        except (ValueError, KeyError, TypeError):
            return None


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _is_local(path: epath.Path) -> bool:
    return "://" not in str(path)


class RunLock:
    """`with RunLock(workdir): ...` or acquire() / release(). acquire raises RunLockedError naming the owner."""

    def __init__(self, workdir: str | os.PathLike, *, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S, use_flock: bool | None = None):
        self.workdir = epath.Path(workdir)
        self.path = self.workdir / LOCK_NAME
        self.heartbeat_s = float(heartbeat_s)
        self.stale_after_s = float(stale_after_s)
        self.use_flock = _is_local(self.path) if use_flock is None else bool(use_flock)
        self.me = Owner(host=socket.gethostname(), pid=os.getpid(),
                        started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        heartbeat=time.time(), token=uuid.uuid4().hex, workdir=str(self.workdir))
        self.lost = False
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._io = threading.Lock()

    # ---------------------------------------------------------------------------------------------- acquire
    def acquire(self) -> None:
        if self.use_flock:
            self._acquire_flock()
        else:
            self._acquire_shared()
        self._thread = threading.Thread(target=self._heartbeat_loop, name="dit-jax-run-lock", daemon=True)
        self._thread.start()

    def _refuse(self, owner: Owner | None) -> RunLockedError:
        who = owner.describe() if owner else "an owner whose lock file cannot be read"
        return RunLockedError(
            f"{self.workdir} is in use by another trainer ({who}): one trainer per run. Wait for it to finish, stop "
            f"it, or train into another --workdir (a trainer that stopped without releasing the lock is detected: "
            f"its process is gone, or it missed heartbeats for {_age(self.stale_after_s)})")

    def _record(self, owner: Owner) -> str:
        return json.dumps(dataclasses.asdict(owner), indent=1) + "\n"

    def _stale_reason(self, owner: Owner | None, flock_free: bool) -> str | None:
        """Why the lock's owner is dead (None: it may be alive)."""
        if owner is None:
            return "its lock file is unreadable" if flock_free else None
        age = time.time() - owner.heartbeat
        if owner.host == self.me.host:
            if not _pid_alive(owner.pid):
                return f"pid {owner.pid} is no longer running on this host"
            if flock_free:  # alive but not holding the lock: the pid was reused, or the trainer let go of it
                return f"pid {owner.pid} no longer holds the lock"
            return None
        if age > self.stale_after_s:
            return f"no heartbeat from host {owner.host} for {_age(age)}"
        return None

    def _acquire_flock(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refuse(self._read_retry()) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(str(self.path)).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous owner released (unlinked) this file between our open and flock: again
        else:
            raise RunLockedError(f"could not lock {self.path}: it keeps being replaced")
        try:
            text = os.pread(fd, 1 << 16, 0).decode("utf-8", "replace")
            if text.strip():
                previous = Owner.parse(text)
                reason = self._stale_reason(previous, flock_free=True)
                if reason is None:  # an owner on another host whose file system does not share flock
                    raise self._refuse(previous)
                warn(f"taking over the lock of {self.workdir} from a trainer that is gone ({reason}; it was "
                     f"{previous.describe() if previous else 'unknown'})")
            self._fd = fd
            self._write_fd(self.me)
        except BaseException:
            if self._fd is None:
                os.close(fd)
            raise

    def _acquire_shared(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            previous = self._read_retry()
            reason = self._stale_reason(previous, flock_free=False)
            if previous is None:
                reason = "its lock file is unreadable"
            if reason is None:
                raise self._refuse(previous)
            warn(f"taking over the lock of {self.workdir} from a trainer that is gone ({reason})")
        self.path.write_text(self._record(self.me))
        time.sleep(min(1.0, self.heartbeat_s))  # let a concurrent writer's object land, then read back
        current = self._read_retry()
        if current is None or current.token != self.me.token:
            raise self._refuse(current)

    def _read_retry(self, tries: int = 3) -> Owner | None:
        for i in range(tries):
            try:
                owner = Owner.parse(self.path.read_text())
            except (OSError, FileNotFoundError):
                owner = None
            if owner is not None:
                return owner
            time.sleep(0.2 * (i + 1))  # a heartbeat being written
        return None

    def _write_fd(self, owner: Owner) -> None:
        data = self._record(owner).encode()
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))
        os.fsync(self._fd)

    # ---------------------------------------------------------------------------------------------- heartbeat
    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.beat()
            except Exception as e:  # noqa: BLE001  (a missed heartbeat is retried; the owner still runs)
                log.warning("could not renew the run lock %s: %r", self.path, e)

    def beat(self) -> None:
        """Renew the heartbeat (the background thread calls this every heartbeat_s)."""
        with self._io:
            if self._fd is None and self._thread is None:
                return
            if self._fd is not None:
                self.me = dataclasses.replace(self.me, heartbeat=time.time())
                self._write_fd(self.me)
                return
            current = self._read_retry()
            if current is not None and current.token != self.me.token:
                if not self.lost:
                    self.lost = True
                    warn(f"the lock of {self.workdir} was taken over by another trainer ({current.describe()}): "
                          f"this trainer stops at its next checkpoint")
                return
            self.me = dataclasses.replace(self.me, heartbeat=time.time())
            self.path.write_text(self._record(self.me))

    # ---------------------------------------------------------------------------------------------- release
    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._io:
            try:
                if self._fd is not None:
                    os.ftruncate(self._fd, 0)
                    os.unlink(str(self.path))  # still under flock: nobody else holds this inode
                elif not self.lost and self._thread is not None:
                    current = self._read_retry(1)
                    if current is not None and current.token == self.me.token:
                        self.path.unlink()
            except OSError as e:
                log.warning("could not remove the run lock %s: %r", self.path, e)
            finally:
                if self._fd is not None:
                    os.close(self._fd)  # releases the flock
                    self._fd = None
                self._thread = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
