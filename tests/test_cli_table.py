"""dit_jax/cli.py: one command table; `dit-jax --help` imports neither jax nor any command module, and every
command's own --help works (importing only that command's module)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dit_jax.cli import COMMANDS
from tests.cli_errors import REPO

PROBE = """
import json, sys
from dit_jax.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps(dict(code=code, jax="jax" in sys.modules, dit_jax=sorted(m for m in sys.modules
                                                                         if m.startswith("dit_jax")))))
"""


def _probe(*argv: str) -> tuple[dict, str]:
    p = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, cwd=REPO, timeout=300)
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stdout


def test_top_level_help_imports_neither_jax_nor_any_command():
    result, out = _probe("--help")
    assert result["code"] == 0
    assert not result["jax"], "dit-jax --help imported jax"
    assert result["dit_jax"] == ["dit_jax", "dit_jax.cli", "dit_jax.errors"]
    for name, (_, help_text) in COMMANDS.items():  # every command is listed with its help
        assert name in out and help_text.split()[0] in out


def test_an_unknown_command_is_a_usage_error_without_imports():
    result, _ = _probe("smaple", "--ckpt", "x")
    assert result["code"] == 2 and not result["jax"]


def test_a_command_imports_no_other_command_module():
    result, _ = _probe("flops", "--help")
    assert result["code"] == 0
    own = COMMANDS["flops"][0]  # dit_jax.perf.cli, which also holds `bench`
    others = {module for name, (module, _) in COMMANDS.items() if module != own}
    assert own in result["dit_jax"] and not others & set(result["dit_jax"])
    assert "dit_jax.perf.bench" not in result["dit_jax"]  # nor the other command's library


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_help_works(name, capsys):
    from dit_jax.cli import main

    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dit-jax {name}")
