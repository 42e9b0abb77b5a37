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
    assert cli.main(base) == 2  # neither --ckpt nor --random-init: a usage error
    assert "--ckpt" in capsys.readouterr().err
    assert cli.main(base[:2] + ["DDT-B/2", "--ckpt", str(ckpt)] + base[3:]) == 1  # wrong size: named keys
    assert "blocks" in capsys.readouterr().err


def test_sample_ddt_fid_mode_is_keyed_per_example_and_resumes(ckpt, vae, tmp_path, capsys):
    """--num-samples writes sample-fid's layout: balanced shuffled labels, shards, <folder>.npz; each sample is the
    DDT sampler run on normal(fold_in(key(seed), i)) whatever the batch or device count; a lost shard is redone."""
    import jax
    import jax.numpy as jnp

    from dit_jax.diffusion import flow
    from dit_jax.diffusion.sharing import uniform_schedule
    from dit_jax.sample import data_mesh, example_keys
    from dit_jax.sample_ddt import DDTSampler, KeyedDDTSampler, load_ddt
    from dit_jax.sample_fid import fid_labels

    argv = ["sample-ddt", "--variant", "DDT-S/2", "--ckpt", str(ckpt), "--steps", "4", "--refresh-rate", "2",
            "--vae", str(vae), "--num-samples", "10", "--per-device-batch", "1", "--seed", "3",
            "--sample-dir", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    assert "10 images for FID" in capsys.readouterr().out
    folder = tmp_path / "DDT-S-2-size-256-vae-vae-cfg-2.0-steps-4-encoder-2-seed-3"
    shards = sorted(folder.glob("shard_*.npz"))
    assert len(shards) == 2  # 8 devices x 1 per device: shards of 8 and 2
    with np.load(f"{folder}.npz") as f:
        images = f["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (10, 64, 64, 3) and images.std() > 0
    labels = np.concatenate([np.load(s)["labels"] for s in shards])
    np.testing.assert_array_equal(labels, fid_labels(10, 1000, 3))

    # The first shard's latents as the plain sampler on one device given noise normal(fold_in(key(seed), i)) for
    # example i (the CLI padded the 2-example second shard the same way).
    model = load_ddt("DDT-S/2", 256, str(ckpt))
    settings = flow.FlowSampleSettings(num_steps=4, cfg_scale=2.0, interval_min=0.3, last_step=0.04)
    keys = example_keys(3, np.arange(8))
    noise = jnp.stack([jax.random.normal(k, (32, 32, 4)) for k in keys])
    plain = np.asarray(DDTSampler(model, settings, schedule=uniform_schedule(4, 2))(labels[:8], noise))
    keyed = KeyedDDTSampler(DDTSampler(model, settings, schedule=uniform_schedule(4, 2)), model, data_mesh())
    np.testing.assert_allclose(np.asarray(keyed(labels[:8], keys)), plain, atol=2e-5)

    # Resume: a missing shard is resampled, the finished one is kept, and the .npz comes out the same.
    kept = shards[0].stat().st_mtime_ns
    shards[1].unlink()
    assert cli.main(argv) == 0
    assert shards[0].stat().st_mtime_ns == kept and shards[1].exists()
    with np.load(f"{folder}.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], images)
    # Other settings into the same folder are refused.
    assert cli.main(argv + ["--interval-min", "0.2"]) == 1
    assert "other settings" in capsys.readouterr().err
