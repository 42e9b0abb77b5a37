"""`dit-jax ddt-schedule`, `dit-jax sample` and `dit-jax sample-fid` end to end on a checkpoint in the released layout (a Lightning
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


def test_ddt_schedule_then_sample_with_it(ckpt, vae, tmp_path, capsys):
    sched = tmp_path / "s.json"
    assert cli.main(["ddt-schedule", "--variant", "DDT-S/2", "--checkpoint", str(ckpt), "--num-steps", "6",
                     "--refresh-rate", "2", "--batch", "2", "--out", str(sched)]) == 0
    meta = json.loads(sched.read_text())
    assert meta["schedule"][0] == 0 and len(meta["schedule"]) == 3 and meta["meta"]["num_steps"] == 6
    assert meta["meta"]["cost"] <= meta["meta"]["uniform_cost"] + 1e-12
    out = tmp_path / "grid.png"
    argv = ["sample", "--variant", "DDT-S/2", "--ckpt", str(ckpt), "--steps", "6", "--labels", "1,2",
            "--schedule", str(sched), "--vae", str(vae), "--out", str(out), "--nrow", "2"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "encoder on 3 of 6 steps" in printed
    img = np.asarray(Image.open(out))
    assert img.ndim == 3 and img.shape[2] == 3 and img.std() > 0
    # sample-ddt is another name for sample: the same flags, the same grid
    out2 = tmp_path / "grid2.png"
    assert cli.main(["sample-ddt", *argv[1:-3], str(out2), "--nrow", "2"]) == 0
    assert "encoder on 3 of 6 steps" in capsys.readouterr().out
    np.testing.assert_array_equal(np.asarray(Image.open(out2)), img)


def test_sample_ddt_checkpoint_errors(ckpt, vae, tmp_path, capsys):
    sched = tmp_path / "s.json"
    cli.main(["ddt-schedule", "--variant", "DDT-S/2", "--random-init", "--num-steps", "4", "--refresh-rate", "2",
              "--batch", "1", "--out", str(sched)])
    base = ["sample", "--variant", "DDT-S/2", "--vae", str(vae), "--out", str(tmp_path / "x.png")]
    assert cli.main(base + ["--ckpt", str(ckpt), "--steps", "6", "--schedule", str(sched)]) == 1
    assert "computed for 4 steps" in capsys.readouterr().err
    assert cli.main(base) == 2  # neither --ckpt nor --random-init: a usage error
    err = capsys.readouterr().err
    assert "--ckpt" in err and "--variant" in err
    assert cli.main(base[:2] + ["DDT-B/2", "--ckpt", str(ckpt)] + base[3:]) == 1  # wrong size: named keys
    assert "blocks" in capsys.readouterr().err


def test_sample_fid_on_a_ddt_is_keyed_per_example_and_resumes(ckpt, vae, tmp_path, capsys):
    """`sample-fid --ckpt DDT.ckpt` (with DDT's flow flags) writes sample-fid's layout: balanced shuffled labels,
    shards, <folder>.npz; each sample is the library's Sampler run on normal(fold_in(key(seed), i)) whatever the
    batch or device count; a lost shard is redone."""
    import jax

    from dit_jax.diffusion.sharing import uniform_schedule
    from dit_jax.sampling import SampleSettings, Sampler, data_mesh, example_keys
    from dit_jax.sampling.decode import load_decoder
    from dit_jax.sampling.fid import fid_labels
    from dit_jax.sampling.load import load_model

    argv = ["sample-fid", "--variant", "DDT-S/2", "--ckpt", str(ckpt), "--steps", "4", "--refresh-rate", "2",
            "--vae", str(vae), "--num-samples", "10", "--per-device-batch", "1", "--seed", "3",
            "--sample-dir", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "sampling 10 images from ddt-s2" in printed and "encoder on 2 of 4 steps" in printed
    folder = tmp_path / "ddt-s2-size-256-vae-vae-cfg-2.0-euler-steps-4-encoder-2-seed-3"
    shards = sorted(folder.glob("shard_*.npz"))
    assert len(shards) == 2  # 8 devices x 1 per device: shards of 8 and 2
    with np.load(f"{folder}.npz") as f:
        images = f["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (10, 64, 64, 3) and images.std() > 0
    labels = np.concatenate([np.load(s)["labels"] for s in shards])
    np.testing.assert_array_equal(labels, fid_labels(10, 1000, 3))

    # The first shard's latents as the library's sampler on one device (DDT's defaults: cfg 2.0 in (0.3, 1), last
    # step 0.04, the encoder every 2 steps) over keys fold_in(key(seed), i) for example i (the CLI padded the
    # 2-example second shard the same way), and the same on all 8 devices.
    loaded = load_model(str(ckpt), variant="DDT-S/2")
    settings = SampleSettings(sampler="euler", num_steps=4, cfg_scale=2.0, interval_min=0.3, last_step=0.04,
                              schedule=uniform_schedule(4, 2))
    keys = example_keys(3, np.arange(8))
    one = np.asarray(Sampler(loaded.model, settings, mesh=data_mesh(jax.local_devices()[:1]))(labels[:8], keys))
    sharded = np.asarray(Sampler(loaded.model, settings)(labels[:8], keys))
    np.testing.assert_allclose(sharded, one, atol=2e-5)
    decoder = load_decoder(loaded, str(vae), data_mesh(), progress=False)
    mine = decoder(sharded).astype(int)  # the CLI's first shard is these latents, decoded
    assert np.abs(mine - images[:8].astype(int)).max() <= 1

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
