"""The package as a user installs it: a wheel built from the checkout's tracked files, installed into a fresh
virtualenv outside the checkout, then used from an unrelated folder: `dit-jax --help` and every subcommand's help,
a `runlocal` training, `dit-jax sample --ckpt` on it, and the Colab notebook with SMOKE=1 (nbclient), all against
the installed package, never the checkout.

The virtualenv gets the dependencies the same pins installed into .venv (requirements.txt): a `.pth` line puts
.venv's site-packages after its own, without running .venv's own `.pth` files, so the checkout's editable install
stays invisible (each test checks where `dit_jax` and `configs` are imported from). `pip check` confirms the
wheel's declared requirements (setup.py) are met by those pins. Building and installing takes about 20 s; the
environment is made once per session (a file lock under pytest-xdist).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "launch" / "colab_tpu_demo.ipynb"
pytestmark = pytest.mark.slow


@dataclass
class Installed:
    venv: Path
    python: Path
    site: Path  # the venv's own site-packages
    workdir: Path  # an unrelated folder the commands run in
    env: dict

    def run(self, *argv: str, timeout: float = 300, check: bool = True) -> str:
        r = subprocess.run(list(argv), cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=timeout)
        out = r.stdout + r.stderr
        assert not check or r.returncode == 0, f"{list(argv)} exited {r.returncode}:\n{out[-6000:]}"
        return out


def tracked_tree(dest: Path) -> Path:
    """A copy of what a clone holds (the tracked files), to build from: the wheel must not depend on untracked
    files, and the build leaves nothing in the checkout."""
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        names = [n for n in files.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked archive): all but the venv
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and ".venv" not in p.parts]
    for name in names:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def install(root: Path) -> None:
    """Build the wheel from the tracked files into root/dist and install it into the fresh virtualenv root/venv."""
    src = tracked_tree(root / "src")
    dist = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(dist), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("dit_jax-*.whl")
    # no pip or setuptools of its own: the pinned ones (.venv's) serve, and pip installs into this venv
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=300)
    python = root / "venv" / "bin" / "python"
    (site_packages(python) / "_dit_jax_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--quiet", "--no-deps", "--no-index", str(wheel)], check=True, timeout=300)
    check = subprocess.run([*pip, "check"], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, f"the wheel's requirements are not met by the pins:\n{check.stdout}{check.stderr}"
    (root / "elsewhere").mkdir()


def site_packages(python: Path) -> Path:
    return Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> Installed:
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "wheel-install"
    with FileLock(f"{root}.lock"):
        if not (root / "done").exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            install(root)
            (root / "done").write_text("")
    venv = root / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", JAX_PLATFORMS="cpu",
               PYTHONNOUSERSITE="1")
    return Installed(venv, venv / "bin" / "python", site_packages(venv / "bin" / "python"), root / "elsewhere", env)


def test_the_package_and_its_configs_come_from_the_wheel(installed):
    out = installed.run(str(installed.python), "-c", "import configs, dit_jax, dit_jax.cli; "
                        "print(dit_jax.__file__); print(configs.__file__)")
    for line in out.split():
        assert Path(line).is_relative_to(installed.site), out  # not the checkout's editable install
    assert not Path(installed.workdir / "configs").exists()
    listing = installed.run(str(installed.python), "-m", "pip", "show", "-f", "dit-jax")
    for needed in ("configs/digits.py", "configs/dit_imagenet.py", "configs/ddt_imagenet.py", "dit_jax/cli.py"):
        assert needed in listing, listing


def test_every_command_answers_help(installed):
    from dit_jax.cli import COMMANDS

    assert "usage: dit-jax" in installed.run("dit-jax", "--help")
    for name in COMMANDS:
        out = installed.run("dit-jax", name, "--help", timeout=120)
        assert f"usage: dit-jax {name}" in out, out


def test_a_runlocal_training_then_sampling_it(installed):
    out = installed.run("dit-jax", "train", "--config", "configs/digits.py:runlocal=True", "--workdir", "run")
    assert "done at step 20" in out, out
    rows = [json.loads(line) for line in (installed.workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 20 and all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    out = installed.run("dit-jax", "sample", "--ckpt", "run", "--steps", "5", "--labels", "1,2,3", "--out", "g.png")
    assert (installed.workdir / "g.png").is_file(), out


def test_the_notebook_runs_on_the_installed_package_with_smoke(installed, tmp_path):
    """launch/colab_tpu_demo.ipynb with SMOKE=1 in a kernel of the installed virtualenv (its own kernelspec):
    small random models, nothing downloaded (offline mode makes any download an error), a grid of the eight
    default labels, timings printed, a 30-step training run whose loss falls, the loss plot written."""
    import nbformat
    from nbclient import NotebookClient
    from PIL import Image

    kernels = tmp_path / "jupyter" / "kernels" / "dit-jax-wheel"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [str(installed.python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "dit-jax (wheel)", "language": "python", "env": {"PYTHONNOUSERSITE": "1"}}))
    out = tmp_path / "out"
    env = dict(installed.env, SMOKE="1", DIT_JAX_DEMO_OUT=str(out), DIT_JAX_OFFLINE="1",
               DIT_JAX_CACHE=str(tmp_path / "cache"), JUPYTER_PATH=str(tmp_path / "jupyter"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    old = dict(os.environ)
    os.environ.update(env)  # the kernel inherits the environment of the process that starts it
    try:
        NotebookClient(nb, timeout=600, kernel_name="dit-jax-wheel",
                       resources={"metadata": {"path": str(installed.workdir)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)

    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                     if o.output_type == "stream")
    assert f"python: {installed.python}" in text  # the installed virtualenv's interpreter
    assert f"using the installed dit_jax ({installed.site / 'dit_jax'})" in text, text[:3000]
    assert "jax 0.10.2 on CPU: 8 device(s)" in text  # the 8 simulated devices of tests/conftest.py
    assert "first call" in text and "second call" in text
    with Image.open(out / "grid.png") as im:  # 8 labels, 4 per row, 64x64 images (8x8 latents, an 8x VAE), 2 px pad
        assert im.size == (4 * 64 + 5 * 2, 2 * 64 + 3 * 2)
    rows = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert rows[-1]["step"] == 30 and np.isfinite(losses).all() and losses[-1] < losses[0]
    assert "(fell)" in text and (out / "loss.png").is_file()
