"""A run's checkpoints are never lost: readers never write, one trainer per run, verified checkpoints.

Each test drives the real `dit-jax` command in subprocesses on a tiny digits model (configs/digits.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli_errors import REPO, assert_clean_error

ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
           PYTHONUNBUFFERED="1")
ENV.pop("DIT_JAX_DEBUG", None)
TINY = ["--config.train.log_every=1", "--config.train.global_batch=8", "--config.train.sample_every=0",
        "--config.model.depth=1", "--config.model.hidden_size=32", "--config.model.num_heads=2",
        "--config.model.patch_size=4"]


def train_argv(workdir: Path, steps: int, ckpt_every: int, keep: int = 3) -> list[str]:
    return [sys.executable, "-m", "dit_jax.cli", "train", "--config", str(REPO / "configs" / "digits.py"),
            "--workdir", str(workdir), f"--config.train.steps={steps}", f"--config.train.ckpt_every={ckpt_every}",
            f"--config.train.keep_ckpts={keep}", *TINY]


def run(argv: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def start(argv: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, env=ENV, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_until(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the trainer exited ({proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def steps_in(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def assert_every_step_verifies(workdir: Path) -> list[int]:
    """Every step folder holds exactly the files of its manifest, with their checksums."""
    from dit_jax.train.checkpoint import MANIFEST, UNSUMMED, Checkpointer

    ck = Checkpointer(workdir / "checkpoints", read_only=True)
    steps = ck.all_steps()
    assert steps
    for s in steps:
        manifest = json.loads((workdir / "checkpoints" / str(s) / MANIFEST).read_text())
        assert any("sha256" in e for e in manifest["files"].values())
        assert ck._verify_files(s) is None, s
        on_disk = {str(p.relative_to(workdir / "checkpoints" / str(s)))
                   for p in (workdir / "checkpoints" / str(s)).rglob("*") if p.is_file()}
        # orbax writes commit_success.txt after the manifest (its bookkeeping, not summed)
        assert on_disk - {MANIFEST} - set(UNSUMMED) == set(manifest["files"]) - set(UNSUMMED), s
    ck.close()
    return steps


def flip_bytes(path: Path, offset: int | None = None) -> None:
    """Invert 8 bytes inside the file (its size is unchanged)."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    for i in range(at, min(at + 8, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def array_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)),
               key=lambda p: p.stat().st_size)


# ==========================================================================================================
@pytest.mark.slow
def test_sampling_a_live_run_never_disturbs_its_trainer(tmp_path):
    """`dit-jax sample --ckpt` reads the run over and over while the trainer saves (every 10 steps, a few times a
    second, keeping 2, so steps are written and deleted under the readers): the trainer finishes, every read
    succeeds, every checkpoint verifies, and the run holds only what the trainer wrote."""
    run_dir = tmp_path / "run"
    trainer = start(train_argv(run_dir, steps=400, ckpt_every=10, keep=2), tmp_path / "train.log")
    try:
        wait_until(lambda: steps_in(run_dir), 300, trainer, "the first checkpoint")
        reads, failures = 0, []
        while trainer.poll() is None:
            p = run([sys.executable, "-m", "dit_jax.cli", "sample", "--ckpt", str(run_dir), "--steps", "2",
                     "--labels", "0,1", "--out", str(tmp_path / f"s{reads}.png"), "--no-progress"], timeout=300)
            reads += 1
            if p.returncode != 0:
                failures.append(p.stdout[-1500:] + p.stderr[-1500:])
        log = (tmp_path / "train.log").read_text()
        assert trainer.returncode == 0, log[-4000:]
    finally:
        if trainer.poll() is None:
            os.killpg(trainer.pid, signal.SIGKILL)
    assert reads >= 2, f"only {reads} reads overlapped the training"
    assert not failures, failures[0]
    assert "done at step 400" in log
    assert steps_in(run_dir) == [390, 400]
    assert_every_step_verifies(run_dir)
    # only what the trainer writes: step folders (no temporary, corrupt-aside or reader files), logs, no lock left
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["390", "400"]
    assert {p.name for p in run_dir.iterdir()} <= {"checkpoints", "metrics.jsonl", "tb", "loss.png"}


@pytest.mark.slow
def test_second_trainer_refused_then_takes_over_after_sigkill(tmp_path):
    run_dir = tmp_path / "run"
    first = start(train_argv(run_dir, steps=100_000, ckpt_every=10), tmp_path / "first.log")
    try:
        wait_until(lambda: len(steps_in(run_dir)) >= 1, 300, first, "the first checkpoint")
        lock = json.loads((run_dir / "dit_jax.lock").read_text())
        assert lock["pid"] == first.pid
        second = run(train_argv(run_dir, steps=100_000, ckpt_every=10), timeout=300)
        out = second.stdout + second.stderr
        assert_clean_error(second.returncode, out, "train", "in use by another trainer", f"pid {first.pid}",
                           status=1)
        # the first run is unaffected: it still owns the lock and keeps saving
        seen = steps_in(run_dir)[-1]
        wait_until(lambda: steps_in(run_dir)[-1] > seen, 300, first, "a checkpoint after the refusal")
        assert json.loads((run_dir / "dit_jax.lock").read_text())["token"] == lock["token"]
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    killed_at = steps_in(run_dir)[-1]
    third = run(train_argv(run_dir, steps=killed_at + 3, ckpt_every=10), timeout=400)
    out = third.stdout + third.stderr
    assert third.returncode == 0, out[-4000:]
    assert "taking over the lock" in out and f"pid {first.pid} is no longer running" in out
    assert f"resumed from step {killed_at}" in out
    assert not (run_dir / "dit_jax.lock").exists()  # released at the end


@pytest.mark.slow
def test_flipped_bytes_fall_back_with_a_warning_naming_the_file(tmp_path):
    run_dir = tmp_path / "run"
    p = run(train_argv(run_dir, steps=4, ckpt_every=2))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert steps_in(run_dir) == [2, 4]
    damaged = array_file(run_dir / "checkpoints" / "4")
    size = damaged.stat().st_size
    flip_bytes(damaged)
    assert damaged.stat().st_size == size
    rel = str(damaged.relative_to(run_dir / "checkpoints" / "4"))

    p = run(train_argv(run_dir, steps=6, ckpt_every=2))
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "skipping checkpoint step 4" in out and rel in out and "falling back to step 2" in out, out[-4000:]
    assert "resumed from step 2" in out
    aside = [q for q in (run_dir / "checkpoints").iterdir() if q.name.startswith("4.corrupt-")]
    assert len(aside) == 1 and (aside[0] / rel).exists()  # kept for inspection
    assert steps_in(run_dir) == [2, 4, 6]
    assert_every_step_verifies(run_dir)

    # every step damaged: exit 1 listing each, nothing deleted or moved
    for s in (2, 4, 6):
        flip_bytes(array_file(run_dir / "checkpoints" / str(s)))
    before = sorted(str(q.relative_to(run_dir)) for q in run_dir.rglob("*"))
    p = run(train_argv(run_dir, steps=8, ckpt_every=2))
    out = p.stdout + p.stderr
    assert_clean_error(p.returncode, out, "train", "no checkpoint in", "could be restored", "step 6:", "step 4:", "step 2:",
                       "nothing was deleted", status=1)
    after = sorted(str(q.relative_to(run_dir)) for q in run_dir.rglob("*"))
    assert [a for a in after if "dit_jax.lock" not in a] == [b for b in before if "dit_jax.lock" not in b]


@pytest.mark.slow
def test_newest_verified_step_skips_a_damaged_step(tmp_path):
    """What the NaN stop names (test_train checks its message): a damaged newest step is not the last good one."""
    run_dir = tmp_path / "run"
    p = run(train_argv(run_dir, steps=4, ckpt_every=2))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    from dit_jax.train.checkpoint import Checkpointer

    flip_bytes(array_file(run_dir / "checkpoints" / "4"))
    ck = Checkpointer(run_dir / "checkpoints", read_only=True)
    assert ck.latest_step() == 4 and ck.newest_verified_step() == 2
    ck.close()


def test_ckpt_every_0_saves_only_at_the_end_and_another_width_is_a_clear_error(tmp_path):
    run_dir = tmp_path / "run"
    p = run(train_argv(run_dir, steps=3, ckpt_every=0))  # "0 = only at the end" (configs: train.ckpt_every)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert steps_in(run_dir) == [3]
    before = sorted(str(q.relative_to(run_dir)) for q in run_dir.rglob("*"))
    p = run(train_argv(run_dir, steps=6, ckpt_every=0) + ["--config.model.hidden_size=64"])
    assert_clean_error(p.returncode, p.stdout + p.stderr, "train", "does not match the state this config builds",
                       "new --workdir", status=1)
    assert sorted(str(q.relative_to(run_dir)) for q in run_dir.rglob("*")) == before
