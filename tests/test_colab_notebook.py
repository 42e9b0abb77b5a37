"""launch/colab_tpu_demo.ipynb runs top to bottom on the CPU with SMOKE=1 (nbclient, a real Jupyter kernel)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
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


@pytest.mark.slow
def test_notebook_runs_on_the_cpu_with_smoke(tmp_path, monkeypatch):
    """SMOKE=1: small random models, nothing downloaded (offline mode makes any download an error), a grid of the
    eight default labels, timings printed, a 30-step training run whose loss falls, the loss plot written."""
    import nbformat
    from nbclient import NotebookClient
    from PIL import Image

    out = tmp_path / "out"
    monkeypatch.setenv("SMOKE", "1")
    monkeypatch.setenv("DIT_JAX_DEMO_OUT", str(out))
    monkeypatch.setenv("DIT_JAX_OFFLINE", "1")
    monkeypatch.setenv("DIT_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                     if o.output_type == "stream")
    assert f"python: {sys.executable}" in text  # the kernel is this environment's interpreter
    assert "jax 0.10.2 on CPU: 8 device(s)" in text  # the 8 simulated devices of tests/conftest.py
    assert "first call" in text and "second call" in text
    with Image.open(out / "grid.png") as im:  # 8 labels, 4 per row, 64x64 images (8x8 latents, an 8x VAE), 2 px pad
        assert im.size == (4 * 64 + 5 * 2, 2 * 64 + 3 * 2)
    rows = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert rows[-1]["step"] == 30 and np.isfinite(losses).all() and losses[-1] < losses[0]
    assert "(fell)" in text and (out / "loss.png").is_file()
