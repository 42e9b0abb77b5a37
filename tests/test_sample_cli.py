"""`dit-jax sample` and `dit-jax sample-fid` end to end on a training run (EMA weights, pixel space), and the
EMA-model loader they use."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from dit_jax.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-step digits run of a tiny DiT (one checkpoint, with EMA weights)."""
    from dit_jax.train.config_load import load_config
    from dit_jax.train.loop import train

    workdir = tmp_path_factory.mktemp("run")
    cfg = load_config(str(REPO / "configs" / "digits.py"), [
        "train.steps=2", "train.global_batch=8", "train.ckpt_every=100", "train.log_every=1",
        "train.sample_every=0", "model.depth=1", "model.hidden_size=32", "model.num_heads=2",
        "optim.ema_decay=0.5",
    ])
    out = train(cfg, workdir)
    assert out["step"] == 2
    return workdir, out


def test_load_ema_model_restores_the_ema_weights(run_dir):
    from dit_jax.train.export import is_training_run, load_ema_model
    from dit_jax.train.optim import ema_params

    workdir, out = run_dir
    assert is_training_run(workdir) and is_training_run(workdir / "checkpoints")
    assert not is_training_run(workdir / "tb")
    model, config, step = load_ema_model(workdir)
    assert step == 2 and config.model.hidden_size == 32 and model.hidden_size == 32
    want = jax.tree.leaves(ema_params(out["state"]["opt_state"]))
    got = jax.tree.leaves(nnx.state(model, nnx.Param).to_pure_dict())
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    trained, _, _ = load_ema_model(workdir, use_ema=False)
    diff = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
            zip(jax.tree.leaves(nnx.state(trained, nnx.Param)), got)]
    assert any(diff)  # EMA (decay 0.5) differs from the trained weights after 2 steps
    with pytest.raises(ValueError, match="cannot be overridden"):
        load_ema_model(workdir, depth=3)


def test_sample_cli_writes_grid_and_npz(run_dir, tmp_path, capsys):
    workdir, _ = run_dir
    png, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    argv = ["sample", "--ckpt", str(workdir), "--steps", "3", "--labels", "0,1,2,9", "--nrow", "2",
            "--out", str(png), "--npz", str(npz), "--no-progress", "--seed", "3"]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    with np.load(npz) as f:
        images, labels = f["images"], f["labels"]
    assert images.dtype == np.uint8 and images.shape == (4, 16, 16, 1) and labels.tolist() == [0, 1, 2, 9]
    grid = np.asarray(Image.open(png))
    assert grid.shape == (4 * (2 * 18 + 2), 4 * (2 * 18 + 2))  # 2x2 tiles of 16 px + 2 px padding, upscaled 4x
    # same seed, same images; with a progress bar too
    again = ["sample", "--ckpt", str(workdir), "--steps", "3", "--labels", "0,1,2,9", "--seed", "3",
             "--out", str(tmp_path / "t.png"), "--npz", str(tmp_path / "t.npz")]
    assert main(again) == 0
    with np.load(tmp_path / "t.npz") as f:
        np.testing.assert_array_equal(f["images"], images)


@pytest.mark.parametrize("argv, message, status", [
    (["--labels", "0,10"], "outside [0, 10)", 1),  # known once the model is loaded
    (["--labels", "a,b"], "comma-separated integers", 2),  # usage errors: found before anything is loaded
    (["--steps", "0"], "--steps 0", 2),
    (["--sampler", "ddpm", "--eta", "0.5"], "eta applies to the ddim sampler only", 2),
])
def test_sample_cli_errors(run_dir, tmp_path, capsys, argv, message, status):
    workdir, _ = run_dir
    assert main(["sample", "--ckpt", str(workdir), "--out", str(tmp_path / "x.png"), "--no-progress", *argv]) == status
    err = capsys.readouterr().err
    assert err.startswith("dit-jax sample: error:") and message in err
    assert not (tmp_path / "x.png").exists()


def test_sample_fid_cli_writes_the_adm_npz_and_resumes(run_dir, tmp_path, capsys):
    workdir, _ = run_dir
    argv = ["sample-fid", "--ckpt", str(workdir), "--num-samples", "20", "--per-device-batch", "1", "--steps", "2",
            "--sample-dir", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    npz = next(tmp_path.glob("*.npz"))
    assert npz.name == f"{workdir.name}-step0000002-size-16-vae-none-cfg-1.5-seed-0.npz" and str(npz.resolve()) in out
    with np.load(npz) as f:
        assert list(f.keys()) == ["arr_0"]
        images = f["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (20, 16, 16, 1)
    folder = tmp_path / npz.stem
    shards = sorted(folder.glob("shard_*.npz"))
    assert len(shards) == 3  # 8 devices x 1 per device: 8 + 8 + 4
    labels = np.concatenate([np.load(s)["labels"] for s in shards])
    assert np.all(np.bincount(labels, minlength=10) == 2)  # class-balanced
    # a rerun finds every shard done and rebuilds the same file
    shards[1].unlink()
    npz.unlink()
    assert main(argv) == 0
    with np.load(npz) as f:
        np.testing.assert_array_equal(f["arr_0"], images)
    # other settings into the same folder: refused, with the difference named
    assert main([*argv, "--cfg-scale", "1.5", "--steps", "3"]) == 1
    assert "num_steps" in capsys.readouterr().err


def test_sample_cli_missing_checkpoint(tmp_path, capsys):
    assert main(["sample", "--ckpt", str(tmp_path / "nope.pt"), "--offline", "--no-progress"]) == 1
    assert "nope.pt" in capsys.readouterr().err


def test_sample_and_sample_fid_on_a_latent_checkpoint_with_a_vae(tmp_path, capsys):
    """A latent DiT (width 384: the head count follows from a paper width) given as an official .pt (converted
    into the cache on first use), decoded by a VAE folder:
    RGB uint8 images, a grid, and the ADM .npz; the second run converts nothing."""
    import torch

    from dit_jax.convert import to_official_state_dict
    from dit_jax.models import DiT
    from test_weights import tiny_vae_folder

    model = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=384, depth=1, num_heads=6, num_classes=10,
                rngs=nnx.Rngs(0))
    pt = tmp_path / "tiny.pt"
    torch.save({k: torch.from_numpy(v) for k, v in to_official_state_dict(model).items()}, pt)
    vae = tiny_vae_folder(tmp_path / "vae")  # 2 blocks: 2x upsampling, 4x4 latents -> 8x8 images
    common = ["--ckpt", str(pt), "--vae", str(vae), "--cache-dir", str(tmp_path / "cache"), "--steps", "2",
              "--no-progress"]
    assert main(["sample", *common, "--labels", "1,2,3", "--out", str(tmp_path / "g.png"),
                 "--npz", str(tmp_path / "g.npz")]) == 0
    with np.load(tmp_path / "g.npz") as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (3, 8, 8, 3)
    converted = [d for d in (tmp_path / "cache" / "converted").iterdir() if not d.name.startswith(".")]
    assert len(converted) == 1 and (converted[0] / "dit_config.json").is_file()
    capsys.readouterr()
    assert main(["sample-fid", *common, "--num-samples", "10", "--sample-dir", str(tmp_path / "fid")]) == 0
    npz = next((tmp_path / "fid").glob("*.npz"))
    assert npz.name == "tiny-size-32-vae-vae-cfg-1.5-seed-0.npz"
    with np.load(npz) as f:
        assert list(f.keys()) == ["arr_0"] and f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (10, 8, 8, 3)
    assert "convert" not in capsys.readouterr().err.lower()
