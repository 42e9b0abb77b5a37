"""extract-latents: image folder -> VAE moments in ArrayRecord shards (resumable) -> training on them."""

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from dit_jax.data.latents import LatentsSource, read_latents_meta
from dit_jax.data.extract import extract, shard_path
from dit_jax.models.vae import AutoencoderKL


def make_folder(root, n_per_class=3, size=40):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "dog" / "broken.png").write_bytes(b"not a png at all")


def small_vae():
    return AutoencoderKL(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
                         rngs=nnx.Rngs(0))


def test_extract_shards_resume_and_values(tmp_path):
    make_folder(tmp_path / "imgs")
    from dit_jax.data.sources import ImageFolderSource
    from dit_jax.data.transforms import DecodeImage

    src = ImageFolderSource(tmp_path / "imgs")
    vae = small_vae()
    out = tmp_path / "lat"
    stats = extract(src, vae, out, image_size=32, batch_size=4, flip=True, num_shards=2, progress=False)
    assert stats["encoded"] == 6 and stats["bad_records"] == 1 and stats["shards_written"] == 2
    lat = LatentsSource(out)
    assert len(lat) == 6 and lat.latent_shape == (4, 4, 4)
    meta = read_latents_meta(shard_path(out, 0, 2))
    assert meta["flip"] and meta["image_size"] == 32 and meta["scale"] == pytest.approx(0.18215)
    # the stored moments are the VAE's encoding of the centre crop (and of its mirror image)
    from dit_jax.data.latents import decode_latent_record

    data = decode_latent_record(lat[0]["data"])  # record 0 of shard 0 = source record 0 (cat/0.png)
    img = DecodeImage(32, 3).map(src[0])["x"]
    x = img[None].astype(np.float32) / 127.5 - 1.0
    mean, logvar = vae.encode(x)
    np.testing.assert_allclose(data["mean"], np.asarray(mean[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(data["logvar"], np.asarray(logvar[0]), rtol=1e-5, atol=1e-5)
    mean_f, _ = vae.encode(x[:, :, ::-1])
    np.testing.assert_allclose(data["mean_flip"], np.asarray(mean_f[0]), rtol=1e-5, atol=1e-5)
    assert int(data["label"]) in (0, 1)
    # a second run skips the finished shards; a deleted shard is redone
    again = extract(src, vae, out, image_size=32, batch_size=4, num_shards=2, progress=False)
    assert again["shards_skipped"] == 2 and again["encoded"] == 0
    shard_path(out, 1, 2).unlink()
    redo = extract(src, vae, out, image_size=32, batch_size=4, num_shards=2, progress=False)
    assert redo["shards_written"] == 1 and len(LatentsSource(out)) == 6


@pytest.mark.slow
def test_train_on_extracted_latents(tmp_path):
    from dit_jax.data.sources import ImageFolderSource
    from dit_jax.train.config_load import load_config
    from dit_jax.train.loop import train

    make_folder(tmp_path / "imgs", n_per_class=4)
    extract(ImageFolderSource(tmp_path / "imgs"), small_vae(), tmp_path / "lat", image_size=32, batch_size=8,
            num_shards=1, progress=False)
    # the sample quality during training of a latent run: the FID of the EMA samples decoded by data.vae, through
    # the Inception network of train.eval_inception, against the statistics of the reference batch's arr_0 (no
    # mu/sigma in it, so computed as ADM does): the number dit-jax evaluate's pieces give for those samples.
    # Random Inception weights and a tiny 8x VAE, made here.
    import torch
    from inception_reference import random_inception_state_dict
    from test_readme import _vae_folder

    from dit_jax.train.metrics import read_jsonl

    weights = tmp_path / "pt_inception-random.pth"
    torch.save({k: torch.from_numpy(v) for k, v in random_inception_state_dict(seed=2).items()}, weights)
    np.savez(tmp_path / "reference.npz", np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    cfg = load_config("configs/dit_imagenet.py:variant=S/2,res=32,runlocal=True", [
        f"data.path={tmp_path / 'lat'}", "model.num_classes=2", "data.num_classes=2", "train.steps=3",
        "train.global_batch=8", "train.log_every=1", "train.eval_every=3", "train.eval_num_samples=4",
        f"train.eval_reference={tmp_path / 'reference.npz'}", f"train.eval_inception={weights}",
        f"data.vae={_vae_folder(tmp_path / 'vae')}",
    ])
    out = train(cfg, tmp_path / "run")
    assert out["step"] == 3 and np.isfinite(out["metrics"]["loss"])
    fid = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "fid" in r]
    assert [r["step"] for r in fid] == [3] and "digits_fd" not in fid[0]

    import jax

    from dit_jax import weights as weights_lib
    from dit_jax.evaluate.evaluator import Evaluator
    from dit_jax.evaluate.fid import compute_statistics
    from dit_jax.sampling.decode import Decoder
    from dit_jax.sampling.sampler import data_mesh
    from dit_jax.train.optim import ema_params
    from dit_jax.train.samples import EVAL_SEED, draw

    z = draw(out["graphdef"], ema_params(out["state"]["opt_state"]), out["state"]["rest"], cfg, np.arange(4) % 2,
              jax.random.key(EVAL_SEED), 8)
    images = Decoder(weights_lib.pretrained_vae(cfg.data.vae), data_mesh())(z)
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    evaluator = Evaluator.from_file(str(weights), batch_size=8, progress=False)
    ref = compute_statistics(evaluator.read_activations(str(tmp_path / "reference.npz")).pool)
    want = compute_statistics(evaluator.activations(images).pool).frechet_distance(ref)
    assert np.isfinite(want) and fid[0]["fid"] == pytest.approx(want, rel=1e-5)


def test_store_images_keeps_the_crop_and_a_rerun_must_match(tmp_path):
    """--store-images: each record holds the uint8 centre crop its moments encode; resuming into shards written
    with other options is refused."""
    from dit_jax.data.latents import decode_latent_record
    from dit_jax.data.sources import ImageFolderSource
    from dit_jax.data.transforms import DecodeImage

    make_folder(tmp_path / "imgs")
    src = ImageFolderSource(tmp_path / "imgs")
    out = tmp_path / "lat"
    extract(src, small_vae(), out, image_size=32, batch_size=4, store_images=True, num_shards=1, progress=False)
    lat = LatentsSource(out)
    assert lat.has_images and lat.image_shape == (32, 32, 3) and read_latents_meta(shard_path(out, 0, 1))["images"]
    for k in range(len(lat)):  # the permutation-free shard keeps the source order, minus the broken file
        rec = decode_latent_record(lat[k]["data"])
        img = DecodeImage(32, 3).map(src[k])["x"]
        np.testing.assert_array_equal(rec["image"], img)
        assert rec["image"].dtype == np.uint8 and int(rec["label"]) == int(src[k]["label"])
    with pytest.raises(ValueError, match="new --out"):
        extract(src, small_vae(), out, image_size=32, batch_size=4, store_images=False, num_shards=1, progress=False)


@pytest.mark.slow
def test_ddt_with_repa_trains_on_latents_with_stored_images(tmp_path):
    """configs/ddt_imagenet.py (REPA on, the paper's recipe) on extracted latents: with stored images it trains and
    logs the REPA term; latents without images are refused with a message that names --store-images; a fresh run
    with DINOv2 but no encoder_path is refused before any work."""
    from dit_jax.data.sources import ImageFolderSource
    from dit_jax.train.config_load import ConfigError, load_config
    from dit_jax.train.loop import train

    make_folder(tmp_path / "imgs", n_per_class=4)
    vae = small_vae()
    extract(ImageFolderSource(tmp_path / "imgs"), vae, tmp_path / "lat", image_size=32, batch_size=8, num_shards=1,
            store_images=True, progress=False)
    extract(ImageFolderSource(tmp_path / "imgs"), vae, tmp_path / "plain", image_size=32, batch_size=8,
            num_shards=1, progress=False)
    overrides = ["model.num_classes=2", "data.num_classes=2", "train.steps=3", "train.global_batch=8",
                 "train.log_every=1", "train.ckpt_every=3"]
    spec = "configs/ddt_imagenet.py:variant=S/2,res=32,runlocal=True"
    cfg = load_config(spec, [f"data.path={tmp_path / 'lat'}", *overrides])
    assert cfg.repa.weight == 0.5 and cfg.repa.encoder == "random"
    out = train(cfg, tmp_path / "run")
    m = out["metrics"]
    assert out["step"] == 3 and np.isfinite(m["loss"]) and 0 < m["repa_loss"] <= 2 and m["fm_loss"] > 0
    with pytest.raises(ConfigError, match="--store-images"):
        train(load_config(spec, [f"data.path={tmp_path / 'plain'}", *overrides]), tmp_path / "run2")
    with pytest.raises(ConfigError, match="encoder_path"):
        train(load_config(spec, [f"data.path={tmp_path / 'lat'}", "repa.encoder=dinov2_vitb14", "repa.proj_dim=768",
                                 *overrides]), tmp_path / "run3")
