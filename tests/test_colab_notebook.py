"""launch/colab_tpu_demo.ipynb: committed clean, its form fields, and its install cell's refusals (nbclient, a real
Jupyter kernel). The whole notebook runs with SMOKE=1 against the installed wheel in tests/test_wheel.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "launch" / "colab_tpu_demo.ipynb"


def test_notebook_is_clean_valid_and_has_the_form_fields():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit the notebook without outputs"
    source = "\n".join(c.source for c in code)
    for field in ("labels = ", "cfg_scale = ", "num_steps = ", "seed = "):
        line = next(line for line in source.splitlines() if line.startswith(field))
        assert "#@param" in line, line
    assert 'pretrained_dit("DiT-XL-2-256x256")' in source and "jax[tpu]==0.10.2" in source
    # the install source is the user's: a form field with no address filled in for them
    assert 'SOURCE = ""  #@param {type:"string"}' in source
    assert set(re.findall(r"github\.com/[\w.-]+", NOTEBOOK.read_text())) == {"github.com/YOU"}  # a placeholder only


def test_the_install_cell_stops_without_a_source_it_was_given(tmp_path, monkeypatch):
    """Outside the SMOKE path the install cell installs only from SOURCE: empty, or neither a git address nor a
    wheel file, it stops with the message saying what to put there, before pip runs."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    monkeypatch.delenv("SMOKE", raising=False)
    monkeypatch.setenv("DIT_JAX_DEMO_OUT", str(tmp_path / "out"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    install = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.startswith("SOURCE = "))
    cells = nb.cells[: install + 1]
    for source, needles in (("", ["no SOURCE given", "git+https://github.com/YOU/dit-jax", ".whl", "installed"]),
                            ("dit-jax", ["SOURCE='dit-jax' is neither a git address nor a .whl file"]),
                            (str(tmp_path / "missing.whl"), ["no such wheel file"])):
        nb.cells = [nbformat.v4.new_code_cell(c.source.replace('SOURCE = ""', f"SOURCE = {source!r}", 1))
                    if c is cells[install] else c for c in cells]
        with pytest.raises(CellExecutionError) as info:
            NotebookClient(nb, timeout=120, kernel_name="python3",
                           resources={"metadata": {"path": str(tmp_path)}}).execute()
        message = str(info.value)
        assert "SystemExit" in message and all(n in message for n in needles), message[-2000:]
        assert "CalledProcessError" not in message  # stopped before pip ran
