"""dit_jax.train.run_lock: one trainer per run, on local disks (flock) and on object stores (heartbeats).

The object-store protocol (gs:// workdirs) is exercised on a local folder with use_flock=False: it uses only
exists / read_text / write_text / unlink, which epath provides for every backend."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from dit_jax.train.run_lock import LOCK_NAME, RunLock, RunLockedError
from tests.cli_errors import REPO


def _write_owner(d, **kw):
    owner = dict(host=socket.gethostname(), pid=os.getpid(), started="2026-01-01T00:00:00+00:00",
                 heartbeat=time.time(), token="someone-else", workdir=str(d))
    owner.update(kw)
    (d / LOCK_NAME).write_text(json.dumps(owner))


def test_local_lock_refuses_a_second_trainer_and_is_released(tmp_path):
    with RunLock(tmp_path, heartbeat_s=0.1) as first:
        owner = json.loads((tmp_path / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname() and owner["started"]
        with pytest.raises(RunLockedError, match=rf"in use by another trainer \(pid {os.getpid()} on host "):
            RunLock(tmp_path).acquire()
        beat = owner["heartbeat"]
        time.sleep(0.4)
        assert json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] > beat  # the heartbeat thread
        assert not first.lost
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(tmp_path):  # free again
        pass


def test_local_lock_of_a_killed_process_is_taken_over(tmp_path, capsys):
    # a real process takes the lock and is SIGKILLed: the kernel drops its flock, the file stays
    code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from dit_jax.train.run_lock import RunLock;"
            f" RunLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {p.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        p.kill()
        p.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == p.pid  # left behind
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert "taking over the lock" in err and f"pid {p.pid} is no longer running" in err


def test_shared_storage_lock_refuses_live_owners_and_takes_over_stale_ones(tmp_path, capsys):
    # another host, heartbeat fresh: alive
    _write_owner(tmp_path, host="other-host", pid=1, heartbeat=time.time() - 5)
    with pytest.raises(RunLockedError, match="pid 1 on host other-host"):
        RunLock(tmp_path, use_flock=False, stale_after_s=60).acquire()
    # this host, its pid running: alive whatever the heartbeat
    _write_owner(tmp_path, heartbeat=0.0)
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path, use_flock=False, stale_after_s=60).acquire()
    # another host, no heartbeat for longer than stale_after_s: taken over
    _write_owner(tmp_path, host="other-host", pid=1, heartbeat=time.time() - 120)
    lock = RunLock(tmp_path, use_flock=False, stale_after_s=60, heartbeat_s=0.05)
    lock.acquire()
    assert "no heartbeat from host other-host for 2 min" in capsys.readouterr().err
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.me.token
    # presumed dead meanwhile and taken over by another trainer: this one learns it has lost the run
    _write_owner(tmp_path, host="third-host", pid=7)
    lock.beat()
    assert lock.lost and "taken over by another trainer" in capsys.readouterr().err
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "third-host"  # not ours to remove


def test_unreadable_lock_file(tmp_path):
    (tmp_path / LOCK_NAME).write_text("{not json")
    with RunLock(tmp_path):  # local: nobody holds its flock, so whoever wrote it is gone
        pass
    (tmp_path / LOCK_NAME).write_text("{not json")
    with RunLock(tmp_path, use_flock=False, heartbeat_s=0.05):  # shared: unreadable counts as stale
        pass
    assert not (tmp_path / LOCK_NAME).exists()
