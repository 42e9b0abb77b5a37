"""Shared by the bad-input tests (tests/test_errors_*.py): run a `dit-jax` command and check the error convention
of dit_jax/errors.py (non-zero exit, one `dit-jax COMMAND: error: ...` line, no traceback); tables of cases (`Case`,
built with `case`, `without`, `replace` and `flag_cases`) and `run_case`, which runs one against a folder of inputs
that no command may write into."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

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
    d.mkdir(exist_ok=True)
    d.chmod(0o500)
    return d


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry under `folder` with its size and mtime (ns): what a reader must leave as it is."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


class Case(NamedTuple):
    """One bad command line. In argv and needles, {i} is the inputs folder, {t} the test's tmp_path and {u} a
    folder nothing can be written under (unwritable_dir)."""

    command: str
    argv: tuple[str, ...]
    needles: tuple[str, ...]  # words the error line must hold
    status: int = 1


def case(command: str, *argv: str, needles: tuple[str, ...], status: int = 1) -> Case:
    return Case(command, argv, needles, status)


# the commands' flags that take no value
SWITCHES = ("--random-init", "--no-progress", "--offline", "--overwrite", "--no-flip", "--store-images", "--force",
            "--all", "--list", "--no-convert", "--scan-blocks")


def without(args: tuple[str, ...], *flags: str) -> tuple[str, ...]:
    """args less each of `flags` and its value (none for a switch)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in flags:
            skip = a not in SWITCHES
        else:
            out.append(a)
    return tuple(out)


def replace(args: tuple[str, ...], *flag_values: str) -> tuple[str, ...]:
    """args with each flag set to its value (flag, value, flag, value, ...; a flag args lack is added)."""
    flags, values = flag_values[::2], flag_values[1::2]
    assert len(flags) == len(values), flag_values
    return (*without(args, *flags), *(a for pair in zip(flags, values) for a in pair))


def flag_cases(prefix: str, command: str, args: tuple[str, ...], flag: str,
               values: dict[str, tuple[str, tuple[str, ...]]]) -> dict[str, Case]:
    """{'<prefix>-<name>': `command` with args and `flag` set to value} for each name: (value, needles) of
    `values`; "FLAG" among the needles stands for the flag."""
    return {f"{prefix}-{name}": case(command, *replace(args, flag, value),
                                     needles=tuple(flag if n == "FLAG" else n for n in needles))
            for name, (value, needles) in values.items()}


def run_case(c: Case, inputs: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> str:
    """Run `c`: the error convention with every needle, and nothing written into `inputs`. Returns the output."""
    unwritable = unwritable_dir(tmp_path)

    def fill(text: str) -> str:
        return text.format(i=inputs, t=tmp_path, u=unwritable)

    before = snapshot(inputs)
    rc, out = run_cli([c.command, *map(fill, c.argv)], capfd)
    assert_clean_error(rc, out, c.command, *map(fill, c.needles), status=c.status)
    assert snapshot(inputs) == before, "a command wrote into its inputs"
    return out
