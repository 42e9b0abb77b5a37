"""`dit-jax sample-ddt` and `dit-jax ddt-schedule` end to end on a checkpoint in the released layout (a Lightning
dict written by torch.save from a PyTorch restatement of the reference DDT-S/2), with a local tiny VAE."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dit_jax import cli
from tests.ddt_torch import TorchDDT


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    ref = TorchDDT(cin=4, heads=6, d=384, depth=12, enc=8, p=2, classes=1000)  # DDT-S/2's shape
    with torch.no_grad():
        for prm in ref.parameters():
            prm.mul_(0.5)
    sd = ref.state_dict()
    path = tmp_path_factory.mktemp("ddt") / "ddt-s2.ckpt"
    torch.save({"state_dict": {**{f"ema_denoiser.{k}": v for k, v in sd.items()},
                               "diffusion_trainer.proj.0.0.weight": torch.zeros(3, 3)}}, path)
    return path


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    from test_weights import tiny_vae_folder

    return tiny_vae_folder(tmp_path_factory.mktemp("vae") / "vae")


def test_ddt_schedule_then_sample_ddt_with_it(ckpt, vae, tmp_path, capsys):
    sched = tmp_path / "s.json"
    assert cli.main(["ddt-schedule", "--variant", "DDT-S/2", "--checkpoint", str(ckpt), "--num-steps", "6",
                     "--refresh-rate", "2", "--batch", "2", "--out", str(sched)]) == 0
    meta = json.loads(sched.read_text())
    assert meta["schedule"][0] == 0 and len(meta["schedule"]) == 3 and meta["meta"]["num_steps"] == 6
    assert meta["meta"]["cost"] <= meta["meta"]["uniform_cost"] + 1e-12
    out = tmp_path / "grid.png"
    argv = ["sample-ddt", "--variant", "DDT-S/2", "--ckpt", str(ckpt), "--steps", "6", "--labels", "1,2",
            "--schedule", str(sched), "--vae", str(vae), "--out", str(out), "--nrow", "2"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "encoder on 3 of 6 steps" in printed
    img = np.asarray(Image.open(out))
    assert img.ndim == 3 and img.shape[2] == 3 and img.std() > 0


def test_sample_ddt_errors(ckpt, vae, tmp_path, capsys):
    sched = tmp_path / "s.json"
    cli.main(["ddt-schedule", "--variant", "DDT-S/2", "--random-init", "--num-steps", "4", "--refresh-rate", "2",
              "--batch", "1", "--out", str(sched)])
    base = ["sample-ddt", "--variant", "DDT-S/2", "--vae", str(vae), "--out", str(tmp_path / "x.png")]
    assert cli.main(base + ["--ckpt", str(ckpt), "--steps", "6", "--schedule", str(sched)]) == 1
    assert "computed for 4 steps" in capsys.readouterr().err
    assert cli.main(base) == 1
    assert "--ckpt" in capsys.readouterr().err
    assert cli.main(base[:2] + ["DDT-B/2", "--ckpt", str(ckpt)] + base[3:]) == 1  # wrong size: named keys
    assert "blocks" in capsys.readouterr().err
