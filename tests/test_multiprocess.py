"""The pod path on one machine: the trainer as 2 processes x 4 CPU devices (jax.distributed over gloo).

Against 1 process x 8 devices: the same loss, params and EMA (data parallel and FSDP over both processes); a
SIGKILL of one process (the other is stopped, nothing saved is damaged, the rerun ends bit-identical); SIGTERM
to one process (every process saves the same step and exits 0; the rerun resumes from it); a checkpoint written
by 2 x 4 continued on 1 x 8 and on 1 x 2; only process 0 writes the run's files, every process logs its progress.
Every job runs under a hard time limit (tests/multiproc.py): a hang fails the test.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

from dit_jax import distributed
from dit_jax.train.export import restore_run
from multiproc import DIT_JAX, run, single

STEPS, CKPT_EVERY = 12, 4


def train_cmd(workdir: Path, *overrides: str) -> list[str]:
    return [*DIT_JAX, "train", "--config", "configs/digits.py:runlocal=True", "--workdir", str(workdir),
            f"--config.train.steps={STEPS}", f"--config.train.ckpt_every={CKPT_EVERY}", "--config.train.log_every=1",
            "--config.train.global_batch=16", "--config.train.keep_ckpts=10", "--config.train.sample_every=6",
            "--config.train.sample_steps=4", "--config.train.sample_num_classes=2",
            "--config.train.sample_per_class=2", f"--config.train.eval_every={CKPT_EVERY}",
            "--config.train.eval_num_samples=12", *overrides]


def restore(workdir: Path, step: int | None = None):
    """The run's newest (or `step`'s) checkpoint, onto this process's first device (any topology wrote it)."""
    return restore_run(workdir, step)[2]


def leaves(restored, name: str) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(restored.state[name])]


def max_diff(a, b, names=("params", "opt_state")) -> float:
    worst = 0.0
    for name in names:
        la, lb = leaves(a, name), leaves(b, name)
        assert len(la) == len(lb) > 0
        worst = max(worst, max(float(np.max(np.abs(x - y))) for x, y in zip(la, lb)))
    return worst


def assert_identical(a, b) -> None:
    assert a.step == b.step
    for name in ("params", "opt_state", "rng", "step"):
        for x, y in zip(leaves(a, name), leaves(b, name)):
            np.testing.assert_array_equal(x, y)
    assert a.data_state == b.data_state


def losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}  # a resumed run re-logs steps: the latest wins


def quality(workdir: Path, once: bool = False) -> dict[int, float]:
    """The digits FD the run logged during training (train.eval_every), by step (the latest where a resumed run
    logged a step again; once: assert that none was logged twice)."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "digits_fd" in r]
    assert not once or len(steps) == len(set(steps)), steps
    return {r["step"]: r["digits_fd"] for r in rows if "digits_fd" in r}


@dataclass
class Runs:
    root: Path
    logs: list[str]  # the 2 x 4 run's output, per process


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """The uninterrupted runs the tests compare against: 1 x 8 and 2 x 4 (data parallel), made once per session
    even when pytest-xdist spreads the tests over workers (the first one makes them, under a file lock)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "mp-runs"  # xdist: one per session
    with FileLock(f"{root}.lock"):
        if not (root / "logs.json").exists():
            single(train_cmd(root / "ref8"), cpu_devices=8)
            job = run(train_cmd(root / "mp"), 2, cpu_devices=4)
            (root / "logs.json").write_text(json.dumps([job.text(i) for i in range(2)]))
    return Runs(root, json.loads((root / "logs.json").read_text()))


@pytest.mark.slow
def test_two_processes_equal_one_process(runs):
    root = runs.root
    a, b = restore(root / "ref8"), restore(root / "mp")
    assert a.step == b.step == STEPS
    assert max_diff(a, b) < 1e-6
    assert a.data_state["position"] == b.data_state["position"] == STEPS
    la, lb = losses(root / "ref8"), losses(root / "mp")
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([lb[s] for s in la], [la[s] for s in la], rtol=1e-6)

    # the sample quality at every 4th step: scored and logged on process 0 alone, as one process scores it
    qa, qb = quality(root / "ref8", once=True), quality(root / "mp", once=True)
    assert sorted(qa) == sorted(qb) == list(range(CKPT_EVERY, STEPS + 1, CKPT_EVERY))
    np.testing.assert_allclose([qb[s] for s in qa], [qa[s] for s in qa], rtol=1e-4)

    # only process 0 writes the run's files; every process logs its own progress, with its index
    for i in range(2):
        text = runs.logs[i]
        assert f"[p{i}/2] step {STEPS}/{STEPS} " in text, text[-3000:]
        assert f"[p{i}/2] model " in text
    assert "[p0/2] step 4 sample quality (12 EMA samples): digits_fd=" in runs.logs[0]
    assert "sample quality" not in runs.logs[1]
    files = sorted(p.relative_to(root / "mp").as_posix() for p in (root / "mp").rglob("*") if p.is_file())
    assert "metrics.jsonl" in files and "loss.png" in files
    assert [f for f in files if f.startswith("samples/")] == ["samples/ema_samples_0000006.png"]
    assert len([f for f in files if f.startswith("tb/")]) == 1  # one TensorBoard event file: process 0's
    manifests = [f for f in files if f.endswith("dit_jax_manifest.json")]
    assert len(manifests) == STEPS // CKPT_EVERY


@pytest.mark.slow
def test_fsdp_over_both_processes_equals_one_process(tmp_path):
    fsdp = ("--config.fsdp=True", "--config.mesh.fsdp=8", "--config.mesh.data=1")
    single(train_cmd(tmp_path / "ref8", *fsdp), cpu_devices=8)
    run(train_cmd(tmp_path / "mp", *fsdp), 2, cpu_devices=4)
    a, b = restore(tmp_path / "ref8"), restore(tmp_path / "mp")
    assert a.step == b.step == STEPS
    assert max_diff(a, b) < 1e-6
    la, lb = losses(tmp_path / "ref8"), losses(tmp_path / "mp")
    np.testing.assert_allclose([lb[s] for s in la], [la[s] for s in la], rtol=1e-6)


@pytest.mark.slow
def test_sigkill_of_one_process_stops_the_other_and_the_rerun_is_exact(runs, tmp_path):
    root = runs.root
    work = tmp_path / "killed"
    fault = [{}, {"DIT_JAX_FAULT_AFTER_STEP": "8"}]  # process 1 SIGKILLs itself once step 8 is saved
    job = run(train_cmd(work), 2, cpu_devices=4, extra_env=fault, expect_ok=False, grace=10)
    assert job.returncodes[1] == -signal.SIGKILL, job.returncodes
    assert job.stopped_by == "failure of process 1"
    assert job.returncodes[0] != 0  # stopped by the launcher (or failed in its next collective): no hang
    assert job.seconds < 200

    rerun = run(train_cmd(work), 2, cpu_devices=4)
    m = re.search(r"\[p0/2\] resumed from step (\d+)", rerun.text(0))
    assert m and int(m.group(1)) in (4, 8), rerun.text(0)[-3000:]
    assert f"[p1/2] resumed from step {m.group(1)}" in rerun.text(1)
    for i in range(2):
        assert "skipping checkpoint" not in rerun.text(i)  # nothing saved was damaged
    assert_identical(restore(work), restore(root / "mp"))
    # the quality history is whole: step 8's evaluation, lost with the kill after its save, is made up on resume
    q, want = quality(work), quality(root / "mp")
    assert sorted(q) == sorted(want)
    np.testing.assert_allclose([q[s] for s in want], [want[s] for s in want], rtol=1e-6)


@pytest.mark.slow
def test_sigterm_to_one_process_saves_one_step_everywhere(runs, tmp_path):
    root = runs.root
    work = tmp_path / "preempted"
    sent = []

    def on_line(i, line, send):
        if i == 1 and not sent and "[p1/2] step 3/" in line:
            sent.append(True)
            send(1, signal.SIGTERM)  # the notice reaches one host only

    job = run(train_cmd(work), 2, cpu_devices=4, on_line=on_line)
    assert sent and job.returncodes == [0, 0]
    steps = [re.search(r"\[p%d/2\] SIGTERM: saved step (\d+) and stopping" % i, job.text(i)) for i in range(2)]
    assert all(steps), [job.text(i)[-2000:] for i in range(2)]
    saved = {int(s.group(1)) for s in steps}
    assert len(saved) == 1 and (stop := saved.pop()) < STEPS
    assert restore(work).step == stop

    rerun = run(train_cmd(work), 2, cpu_devices=4)
    for i in range(2):
        assert f"[p{i}/2] resumed from step {stop}" in rerun.text(i)
    assert_identical(restore(work), restore(root / "mp"))


@pytest.mark.slow
@pytest.mark.parametrize("devices", [8, 2])
def test_checkpoint_of_two_processes_continues_on_one(runs, tmp_path, devices):
    root = runs.root
    work = tmp_path / "moved"
    shutil.copytree(root / "mp", work)
    for d in (work / "checkpoints").iterdir():  # keep step 4: the run continues from there on another topology
        if d.name.isdigit() and int(d.name) > 4:
            shutil.rmtree(d)
    out = single(train_cmd(work), cpu_devices=devices)
    assert "resumed from step 4" in out
    q, want = quality(work), quality(root / "ref8")  # step 4's from the 2 x 4 run, the rest from this one
    assert sorted(q) == sorted(want)
    np.testing.assert_allclose([q[s] for s in want], [want[s] for s in want], rtol=1e-4)
    a, b = restore(work), restore(root / "ref8")
    assert a.step == b.step == STEPS
    assert a.data_state["position"] == STEPS
    assert max_diff(a, b) < 1e-6


# ----------------------------------------------------------------------------------------------------------------
# The start itself: flags, variables, what is missing (no JAX job is started here).
# ----------------------------------------------------------------------------------------------------------------
def test_partial_settings_name_what_is_missing(monkeypatch):
    for k in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(distributed, "detected_cluster", lambda: None)
    assert distributed.initialize().any is False  # nothing given, nothing detected: one process
    with pytest.raises(distributed.DistributedError, match=r"missing: --num-processes N .*--process-id I"):
        distributed.initialize(coordinator="127.0.0.1:1234")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "4")
    with pytest.raises(distributed.DistributedError, match=r"missing: --coordinator HOST:PORT .*--process-id"):
        distributed.initialize()
    s = distributed.resolve(coordinator="h:1", process_id=2)  # the flag wins, the variable fills in
    assert (s.coordinator, s.num_processes, s.process_id) == ("h:1", 4, 2)
    for kw, msg in ((dict(coordinator="nohostport"), "HOST:PORT"), (dict(process_id=4), "not below"),
                    (dict(num_processes=0), ">= 1")):
        with pytest.raises(distributed.DistributedError, match=msg):
            distributed.resolve(**kw)
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "x")
    with pytest.raises(distributed.DistributedError, match="not an integer"):
        distributed.resolve()


def test_cli_reports_a_partial_start_as_an_error(tmp_path):
    import subprocess
    import sys

    from multiproc import REPO

    r = subprocess.run([sys.executable, "-m", "dit_jax.cli", "train", "--config", "configs/digits.py:runlocal=True",
                        "--workdir", str(tmp_path / "w"), "--coordinator", "127.0.0.1:1"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "dit-jax train: error:" in r.stderr and "--num-processes" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------------------------------------------
# The local launcher (launch/local/multiprocess.sh -> dit_jax/multiprocess.py).
# ----------------------------------------------------------------------------------------------------------------
def test_launcher_wires_each_process_and_prefixes_its_lines():
    import subprocess
    import sys

    from multiproc import REPO

    code = "import os; print(os.environ['JAX_PROCESS_ID'], os.environ['JAX_NUM_PROCESSES'], " \
           "os.environ['JAX_COORDINATOR_ADDRESS'], os.environ['JAX_NUM_CPU_DEVICES'])"
    r = subprocess.run([str(REPO / "launch" / "local" / "multiprocess.sh"), "-n", "3", "--cpu-devices", "2", "--",
                        sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = sorted(r.stdout.splitlines())
    assert [line.split()[:3] for line in lines] == [["[p0]", "0", "3"], ["[p1]", "1", "3"], ["[p2]", "2", "3"]]
    assert len({line.split()[3] for line in lines}) == 1 and lines[0].split()[3].startswith("127.0.0.1:")
    assert {line.split()[4] for line in lines} == {"2"}


def test_launcher_stops_the_others_when_one_fails():
    import subprocess
    import sys
    import time

    from multiproc import REPO

    code = "import os, sys, time; i = int(os.environ['JAX_PROCESS_ID']); time.sleep(0.5); " \
           "sys.exit(3) if i == 1 else time.sleep(120)"
    t0 = time.monotonic()
    r = subprocess.run([str(REPO / "launch" / "local" / "multiprocess.sh"), "-n", "2", "--grace", "2", "--",
                        sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3
    assert time.monotonic() - t0 < 30
    assert "failure of process 1" in r.stderr


def test_a_cluster_jax_detects_needs_no_flags(monkeypatch):
    """Under SLURM (as on a TPU VM slice) JAX's own detection finds the job: initialize() hands over to
    jax.distributed.initialize() with what is known, and --num-processes is checked against the job."""
    for k in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(k, raising=False)
    assert distributed.detected_cluster() is None  # this machine: no cluster
    slurm = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="node[1-2]", SLURM_NTASKS="2", SLURM_PROCID="1",
                 SLURM_LOCALID="0")
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    assert distributed.detected_cluster() == "SlurmCluster"
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a: calls.append(a))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed, "_check_count", lambda s: None)
    distributed.initialize(num_processes=2)
    assert calls == [(None, 2, None)]  # JAX fills in the coordinator and the id from SLURM
