"""Shared by the bad-input tests (tests/test_errors_*.py): run a `dit-jax` command and check the error convention
of dit_jax/errors.py (non-zero exit, one `dit-jax COMMAND: error: ...` line, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(argv: list[str], capfd: pytest.CaptureFixture, *, env: dict[str, str] | None = None) -> tuple[int, str]:
    """dit_jax.cli.main(argv) in this process -> (exit status, stdout + stderr). SystemExit (argparse) counts."""
    from dit_jax.cli import main

    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    capfd.readouterr()
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out = capfd.readouterr()
    return rc, out.out + out.err


def run_cli_subprocess(argv: list[str], *, timeout: float = 300, env: dict[str, str] | None = None,
                       cwd: str | Path | None = None) -> tuple[int, str]:
    """`python -m dit_jax.cli ARGV` in a fresh process (for what must not share this process: JAX's distributed
    state, signals, a trainer) -> (exit status, stdout + stderr)."""
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("DIT_JAX_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "dit_jax.cli", *argv], capture_output=True, text=True,
                       timeout=timeout, env=full_env, cwd=str(cwd or REPO))
    return p.returncode, p.stdout + p.stderr


def assert_clean_error(rc: int, output: str, command: str, *needles: str, status: int | None = None) -> None:
    """Non-zero exit (or exactly `status`), no traceback, an error line for `command` that contains every
    needle (case-insensitive)."""
    assert rc != 0, f"expected a failure, got exit 0:\n{output[-3000:]}"
    if status is not None:
        assert rc == status, f"exit status {rc}, expected {status}:\n{output[-3000:]}"
    assert "Traceback" not in output, f"a traceback reached the user:\n{output[-5000:]}"
    lines = [line for line in output.splitlines() if ": error: " in line]
    assert lines, f"no 'error:' line:\n{output[-3000:]}"
    line = lines[-1]
    prefix = f"dit-jax {command}: error: " if command else "dit-jax: error: "
    assert line.startswith(prefix) or line.startswith("dit-jax: error: "), line
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in the error line: {line}"


def unwritable_dir(tmp_path: Path) -> Path:
    """A folder nothing can be written under: a read-only folder, or (as root, who ignores permissions) a path
    under /sys, where even root cannot create files."""
    if os.geteuid() == 0:
        return Path("/sys/dit-jax-unwritable")
    d = tmp_path / "readonly"
    d.mkdir()
    d.chmod(0o500)
    return d
