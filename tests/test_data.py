"""dit_jax.data: ADM centre crop, TFDS / image folder / digits / latent sources, exact resume, sharding."""

from __future__ import annotations

import io
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from dit_jax.data import (
    center_crop_arr,
    decode_latent_record,
    encode_latent_record,
    load_digits_arrays,
    make_train_iterator,
    read_latents_meta,
    write_latents,
)
from dit_jax.train.config_schema import base_config


def cfg(**kw):
    """config.data as the schema builds it (every field, with its default), with `kw` set."""
    c = base_config().data
    c.update(kw)
    return c


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p["x"], q["x"])
        np.testing.assert_array_equal(p["y"], q["y"])


# ------------------------------------------------------------------------------------- ADM centre crop
def reference_center_crop(pil_image, image_size):
    """guided-diffusion image_datasets.py center_crop_arr (8fb3ad9, L126), transcribed as written."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def test_center_crop_picks_the_centre_of_a_wide_image():
    # 600 wide x 300 high, each column a known value: a linear ramp in x (same in every row and channel)
    w, h, size = 600, 300, 256
    ramp = np.linspace(0.0, 240.0, w)
    img = np.repeat(np.round(ramp)[None, :, None], h, 0).repeat(3, 2).astype(np.uint8)
    out = center_crop_arr(Image.fromarray(img), size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, reference_center_crop(Image.fromarray(img), size))
    # by hand: short side 300 < 512, so no BOX halving; BICUBIC to 512 x 256; crop columns 128..383 of 512,
    # whose centres map back to source x = (128 + j + 0.5) * 600 / 512 - 0.5 (150 .. 450: the middle half)
    j = np.arange(size)
    src_x = (128 + j + 0.5) * w / 512 - 0.5
    expected = np.interp(src_x, np.arange(w), ramp)
    assert np.abs(out[:, :, 0].astype(float) - expected[None, :]).max() <= 1.0
    assert (out == out[:1]).all()  # every row the same


def test_center_crop_box_halving_steps(monkeypatch):
    calls = []
    orig = Image.Image.resize

    def spy(self, size, resample=None, *a, **k):
        calls.append((tuple(size), resample))
        return orig(self, size, resample, *a, **k)

    monkeypatch.setattr(Image.Image, "resize", spy)
    rng = np.random.default_rng(0)
    # short side 1100 >= 2*256: halve to 1000x550, again (550 >= 512) to 500x275, then BICUBIC to 465x256
    img = Image.fromarray(rng.integers(0, 256, (1100, 2000, 3), dtype=np.uint8))
    out = center_crop_arr(img, 256)
    assert calls == [((1000, 550), Image.BOX), ((500, 275), Image.BOX), ((465, 256), Image.BICUBIC)]
    assert out.shape == (256, 256, 3)
    calls.clear()
    ref = reference_center_crop(img, 256)
    np.testing.assert_array_equal(out, ref)
    # the boundary: short side exactly 2 * size is halved (>=); 2 * size - 1 is not
    calls.clear()
    center_crop_arr(Image.fromarray(rng.integers(0, 256, (64, 90, 3), dtype=np.uint8)), 32)
    assert calls[0] == ((45, 32), Image.BOX) and calls[1][1] == Image.BICUBIC
    calls.clear()
    out = center_crop_arr(Image.fromarray(rng.integers(0, 256, (63, 90, 3), dtype=np.uint8)), 32)
    assert [c[1] for c in calls] == [Image.BICUBIC] and calls[0][0] == (round(90 * 32 / 63), 32)
    assert out.shape == (32, 32, 3)


def test_decode_image_modes_and_bad_records():
    from dit_jax.data import DecodeImage

    dec = DecodeImage(8, channels=3, num_classes=5)
    grey = dec.map(dict(key=1, image=np.full((20, 12, 1), 200, np.uint8), label=2))
    assert grey["ok"] and grey["x"].shape == (8, 8, 3) and (grey["x"] == 200).all() and grey["y"] == 2
    rgba = dec.map(dict(key=2, image=np.tile(np.array([10, 20, 30, 0], np.uint8), (9, 9, 1)), label=0))
    assert rgba["ok"] and (rgba["x"] == [10, 20, 30]).all()  # alpha dropped, as PIL convert("RGB")
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, "PNG")
    one = DecodeImage(8, channels=1).map(dict(key=3, data=buf.getvalue(), label=4))
    assert one["ok"] and one["x"].shape == (8, 8, 1)
    for rec in (dict(key=4, error="OSError"), dict(key=5, data=b"junk", label=1)):
        bad = dec.map(rec)
        assert not bad["ok"] and bad["x"].shape == (8, 8, 3) and bad["key"] == rec["key"]
    with pytest.raises(ValueError, match="label 7"):
        dec.map(dict(key=6, image=np.zeros((8, 8, 3), np.uint8), label=7))


# ------------------------------------------------------------------------------------------------- TFDS
def test_tfds_source_with_mock_data():
    import tensorflow_datasets as tfds

    c = cfg(source="tfds", name="imagenet2012", split="train", image_size=8, channels=3, random_flip=True,
            num_classes=1000)
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        it = make_train_iterator(c, global_batch=8, seed=0, process_index=0, process_count=1)
        a = take(it, 4)  # 32 examples: crosses into the second epoch
        b = take(make_train_iterator(c, global_batch=8, seed=0, process_index=0, process_count=1), 4)
        other = take(make_train_iterator(c, global_batch=8, seed=1, process_index=0, process_count=1), 4)
        raw = tfds.data_source("imagenet2012", split="train")
        raw_labels = sorted(int(raw[i]["label"]) for i in range(len(raw)))
    for batch in a:
        assert batch["x"].shape == (8, 8, 8, 3) and batch["x"].dtype == np.float32
        assert batch["y"].shape == (8,) and batch["y"].dtype == np.int32
        assert batch["x"].min() >= -1.0 and batch["x"].max() <= 1.0 and batch["x"].std() > 0.05
        assert ((batch["y"] >= 0) & (batch["y"] < 1000)).all()
    # the first epoch (first 24 examples) holds exactly the dataset's labels
    assert sorted(np.concatenate([p["y"] for p in a])[:24].tolist()) == raw_labels
    assert_batches_equal(a, b)
    assert not all(np.array_equal(p["y"], q["y"]) for p, q in zip(a, other))
    assert it.stats()["bad_records"] == 0


# ----------------------------------------------------------------------------------------- image folder
COLOURS = {"a_red": (255, 0, 0), "b_green": (0, 255, 0), "c_white": (255, 255, 255)}


@pytest.fixture()
def image_folder(tmp_path):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    # classes are created in a different order than sorted, so labels must come from sorting
    for name in ["c_white", "a_red", "b_green"]:
        (root / name).mkdir(parents=True)
    for k in range(4):
        size = (40 + 7 * k, 30 + 5 * k)  # (w, h) of varying aspect
        Image.new("RGB", size, COLOURS["a_red"]).save(root / "a_red" / f"r{k}.png")
        Image.new("RGB", size, COLOURS["b_green"]).save(root / "b_green" / f"g{k}.JPG", quality=95)
        Image.new("L", size, 255).save(root / "c_white" / f"w{k}.png")  # greyscale -> RGB
    Image.new("RGBA", (33, 50), (255, 0, 0, 90)).save(root / "a_red" / "rgba.png")  # alpha dropped
    Image.new("RGB", (31, 31), COLOURS["b_green"]).save(root / "b_green" / "g.webp", lossless=True)
    Image.new("RGB", (31, 31), COLOURS["c_white"]).save(root / "c_white" / "w.bmp")
    (root / "b_green" / "notes.txt").write_text("not an image")
    # one corrupt file (random bytes) and one truncated PNG
    (root / "b_green" / "corrupt.png").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (root / "c_white" / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 6 // 10])
    return root  # 15 good images (5 per class) + 2 bad


def test_image_folder_replaces_and_counts_bad_files(image_folder, caplog):
    from dit_jax.data import GlobalOrder
    from dit_jax.data.sources import ImageFolderSource

    c = cfg(source="folder", path=str(image_folder), image_size=16, channels=3, random_flip=True, num_classes=3)
    it = make_train_iterator(c, global_batch=5, seed=0, process_index=0, process_count=1)
    with caplog.at_level(logging.WARNING, logger="dit_jax.data"):
        batches = take(it, 9)  # 45 positions = 2.6 epochs of 17 records (15 good + 2 bad)
    xs = np.concatenate([b["x"] for b in batches])
    ys = np.concatenate([b["y"] for b in batches])
    assert xs.shape == (45, 16, 16, 3) and xs.dtype == np.float32 and ys.dtype == np.int32
    # labels follow the sorted folder names: 0 = a_red, 1 = b_green, 2 = c_white; every example is a good image
    mean = xs.mean(axis=(1, 2))  # (N, 3) in [-1, 1]
    expected = {0: (1, -1, -1), 1: (-1, 1, -1), 2: (1, 1, 1)}
    for y, m in zip(ys, mean):
        np.testing.assert_allclose(m, expected[int(y)], atol=0.05)
    # a bad record's position holds the next key that decodes, so every label is known in advance
    source = ImageFolderSource(str(image_folder))
    names = [source.describe(k) for k in range(len(source))]
    bad = {k for k, n in enumerate(names) if n.endswith(("corrupt.png", "truncated.png"))}
    assert len(bad) == 2
    order = GlobalOrder(len(source), 0)
    keys = [order.key(q) for q in range(45)]
    resolved = []
    for k in keys:
        while k in bad:
            k = (k + 1) % len(source)
        resolved.append(k)
    assert ys.tolist() == [source[k]["label"] for k in resolved]
    stats = it.stats()
    assert stats["bad_records"] == sum(k in bad for k in keys) >= 4
    assert {os.path.basename(n) for n in stats["bad_examples"]} == {"corrupt.png", "truncated.png"}
    assert any("corrupt.png" in r.getMessage() for r in caplog.records)
    assert any("truncated.png" in r.getMessage() for r in caplog.records)


def test_image_folder_errors(tmp_path, image_folder):
    with pytest.raises(ValueError, match="3 class sub-folders"):
        make_train_iterator(cfg(source="folder", path=str(image_folder), image_size=8, num_classes=1000),
                            global_batch=2, seed=0, process_index=0, process_count=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.* has no class sub-folders"):
        make_train_iterator(cfg(source="folder", path=str(tmp_path / "empty"), image_size=8),
                            global_batch=2, seed=0, process_index=0, process_count=1)
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(ValueError, match="no .* files"):
        make_train_iterator(cfg(source="folder", path=str(tmp_path / "empty"), image_size=8),
                            global_batch=2, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="process_count"):
        make_train_iterator(cfg(source="digits"), global_batch=5, seed=0, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="unknown data.source"):
        make_train_iterator(cfg(source="nope"), global_batch=2, seed=0, process_index=0, process_count=1)


# ----------------------------------------------------------------------------------------------- digits
def test_digits_arrays_and_iterator():
    from sklearn.datasets import load_digits

    raw = load_digits()
    x, y = load_digits_arrays(16)
    assert x.shape == (1797, 16, 16, 1) and x.dtype == np.float32 and y.dtype == np.int32
    assert x.min() == -1.0 and x.max() == 1.0
    assert sorted(set(y.tolist())) == list(range(10))
    counts = np.bincount(y, minlength=10)
    assert counts.min() >= 174 and counts.max() <= 183
    x8, _ = load_digits_arrays(8)  # no resize: exactly the data mapped to [-1, 1]
    np.testing.assert_allclose(x8[..., 0], raw.images / 8.0 - 1.0, atol=1e-6)
    # the upsample is smooth: the 16x16 image averaged over 2x2 blocks tracks the 8x8 image
    pooled = x.reshape(-1, 8, 2, 8, 2).mean(axis=(2, 4))
    assert np.abs(pooled - x8[..., 0]).mean() < 0.15

    c = cfg(source="digits", image_size=16, channels=1, random_flip=False, num_classes=10)
    it = make_train_iterator(c, global_batch=64, seed=0, process_index=0, process_count=1)
    batches = take(it, 28)  # 1792 of the 1797 examples of the first epoch
    xs = np.concatenate([b["x"] for b in batches])
    ys = np.concatenate([b["y"] for b in batches])
    assert xs.shape == (1792, 16, 16, 1)
    seen = np.bincount(ys, minlength=10)
    assert (seen <= counts).all() and (seen >= counts - 5).all()
    # every example is a dataset image with its own label, none repeated within the epoch
    index = {x[i].tobytes(): i for i in range(len(x))}
    ids = [index[e.tobytes()] for e in xs]
    assert len(set(ids)) == len(ids)
    np.testing.assert_array_equal(y[ids], ys)


# ---------------------------------------------------------------------------------------------- latents
def make_latents(n, shape=(4, 4, 3), flip=False, label=lambda i: i % 10, seed=0):
    """Records whose mean[..., 0] holds the record id (so batches can be traced back to records)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        mean = rng.normal(size=shape).astype(np.float32)
        mean[..., 0] = i
        logvar = rng.normal(size=shape).astype(np.float32) - 5
        rec = (mean, logvar, label(i))
        if flip:
            mflip = mean[:, ::-1].copy()
            mflip[..., 0] = -1 - i  # marks the flipped orientation
            rec = (*rec, mflip, logvar[:, ::-1].copy())
        out.append(rec)
    return out


def ids_of(batch):
    return batch["x"][:, 0, 0, 0].astype(int)


def test_latents_round_trip_and_meta(tmp_path):
    recs = make_latents(7, flip=True)
    path = tmp_path / "lat" / "train.array_record"
    meta = write_latents(path, recs, meta=dict(vae="stabilityai/sd-vae-ft-ema", image_size=32))
    assert sorted(os.listdir(path.parent)) == ["train.array_record", "train.array_record.json"]  # no temp files
    side = read_latents_meta(path)
    assert side == meta == json.loads((tmp_path / "lat" / "train.array_record.json").read_text())
    assert side["count"] == 7 and side["latent_shape"] == [4, 4, 3] and side["dtype"] == "float32"
    assert side["flip"] is True and side["scale"] == 0.18215 and side["vae"] == "stabilityai/sd-vae-ft-ema"

    from array_record.python.array_record_data_source import ArrayRecordDataSource

    src = ArrayRecordDataSource([str(path)])
    assert len(src) == 7
    for i, (mean, logvar, label, mflip, lflip) in enumerate(recs):
        r = decode_latent_record(src[i])
        np.testing.assert_array_equal(r["mean"], mean)
        np.testing.assert_array_equal(r["logvar"], logvar)
        np.testing.assert_array_equal(r["mean_flip"], mflip)
        np.testing.assert_array_equal(r["logvar_flip"], lflip)
        assert int(r["label"]) == label
    # float16 storage: values equal to float16 rounding
    p16 = tmp_path / "lat16.array_record"
    assert write_latents(p16, recs[:3], meta={}, dtype="float16")["dtype"] == "float16"
    r = decode_latent_record(ArrayRecordDataSource([str(p16)])[2])
    assert r["mean"].dtype == np.float16
    np.testing.assert_array_equal(r["mean"], recs[2][0].astype(np.float16))
    assert "mean_flip" in r
    # a record is a msgpack map (fixmap of 3 entries): nothing is unpickled
    assert encode_latent_record(recs[0][0], recs[0][1], 3)[:1] == b"\x83"
    with pytest.raises(Exception):
        decode_latent_record(b"not a record")
    with pytest.raises(ValueError, match="flip"):
        write_latents(tmp_path / "mixed.array_record", [recs[0], recs[1][:3]], meta={})
    assert not (tmp_path / "mixed.array_record").exists()


def test_latents_iterator_flip_and_bad_records(tmp_path, caplog):
    write_latents(tmp_path / "f.array_record", make_latents(40, flip=True), meta=dict(image_size=32))
    base = dict(source="latents", path=str(tmp_path / "f.array_record"), image_size=32, num_classes=10)
    it = make_train_iterator(cfg(**base, random_flip=True), global_batch=8, seed=0, process_index=0, process_count=1)
    a = take(it, 10)  # two epochs
    assert a[0]["x"].shape == (8, 4, 4, 6) and a[0]["x"].dtype == np.float32
    ids = np.concatenate([ids_of(b) for b in a])
    flipped = ids < 0
    assert 0.25 < flipped.mean() < 0.75  # one orientation per record, picked at random
    true_ids = np.where(flipped, -1 - ids, ids)
    assert sorted(true_ids[:40]) == list(range(40)) and sorted(true_ids[40:]) == list(range(40))
    np.testing.assert_array_equal(np.concatenate([b["y"] for b in a]), true_ids % 10)
    # x = [mean | logvar] of the chosen orientation
    recs = make_latents(40, flip=True)
    b0 = a[0]
    for k in range(8):
        i = int(true_ids[k])
        mean, logvar = (recs[i][3], recs[i][4]) if flipped[k] else (recs[i][0], recs[i][1])
        np.testing.assert_array_equal(b0["x"][k], np.concatenate([mean, logvar], -1))
    # flip off: never the flipped orientation
    off = take(make_train_iterator(cfg(**base, random_flip=False), global_batch=8, seed=0, process_index=0,
                                   process_count=1), 5)
    assert (np.concatenate([ids_of(b) for b in off]) >= 0).all()
    # image_size disagreeing with the sidecar is an error
    with pytest.raises(ValueError, match="image_size"):
        make_train_iterator(cfg(**dict(base, image_size=64)), global_batch=8, seed=0, process_index=0,
                            process_count=1)

    # no flip moments stored + random_flip: a warning, and the original orientation
    write_latents(tmp_path / "nf.array_record", make_latents(16), meta={})
    with caplog.at_level(logging.WARNING, logger="dit_jax.data"):
        it = make_train_iterator(cfg(source="latents", path=str(tmp_path / "nf.array_record"), random_flip=True),
                                 global_batch=8, seed=0, process_index=0, process_count=1)
    assert any("no flipped moments" in r.getMessage() for r in caplog.records)
    assert (np.concatenate([ids_of(b) for b in take(it, 4)]) >= 0).all()

    # a directory of two files plus one corrupt record: read together, the bad one skipped and counted
    from array_record.python.array_record_module import ArrayRecordWriter

    d = tmp_path / "shards"
    write_latents(d / "a.array_record", make_latents(10), meta={})
    w = ArrayRecordWriter(str(d / "b.array_record"), "group_size:1")
    for i, (m, lv, y) in enumerate(make_latents(6)):
        w.write(b"not an npz" if i == 2 else encode_latent_record(m + 100, lv, y))
    w.close()
    meta_b = dict(read_latents_meta(d / "a.array_record"), count=6)
    (d / "b.array_record.json").write_text(json.dumps(meta_b))
    it = make_train_iterator(cfg(source="latents", path=str(d)), global_batch=4, seed=0, process_index=0,
                             process_count=1)
    got = np.concatenate([ids_of(b) for b in take(it, 4)])  # 16 positions = one epoch
    # every good record once, and the bad record 102's position holds the next record, 103
    assert sorted(got.tolist()) == sorted(list(range(10)) + [100, 101, 103, 104, 105] + [103])
    assert it.stats()["bad_records"] == 1
    assert it.stats()["bad_examples"] == [f"{d / 'b.array_record'} record 2"]


def with_images(recs, size=6):
    """Dict records carrying a uint8 image: channel 0 holds the record id, column 0 of channel 1 is 255 (a marker
    that shows which way the image faces)."""
    out = []
    for i, (mean, logvar, label, *flip) in enumerate(recs):
        image = np.zeros((size, size, 3), np.uint8)
        image[..., 0] = i
        image[:, 0, 1] = 255
        rec = dict(mean=mean, logvar=logvar, label=label, image=image)
        if flip:
            rec.update(mean_flip=flip[0], logvar_flip=flip[1])
        out.append(rec)
    return out


def test_latents_carry_their_images_mirrored_with_the_moments(tmp_path):
    """REPA on latents: stored images come out with the record they belong to, mirrored exactly when the flipped
    moments were picked; bad records drop their image too; a resume replays images exactly; latents without
    images are refused when images are asked for."""
    from array_record.python.array_record_module import ArrayRecordWriter

    recs = with_images(make_latents(24, flip=True))
    path = tmp_path / "img.array_record"
    meta = write_latents(path, recs, meta=dict(image_size=48))
    assert meta["images"] is True and meta["image_shape"] == [6, 6, 3]
    r = decode_latent_record(encode_latent_record(recs[3]["mean"], recs[3]["logvar"], 3, image=recs[3]["image"]))
    np.testing.assert_array_equal(r["image"], recs[3]["image"])
    with pytest.raises(ValueError, match="uint8"):
        encode_latent_record(recs[0]["mean"], recs[0]["logvar"], 0, image=recs[0]["image"].astype(np.float32))
    with pytest.raises(ValueError, match="image shape"):  # every record has its image, or none does
        write_latents(tmp_path / "mixed.array_record", [recs[0], {k: v for k, v in recs[1].items() if k != "image"}],
                      meta={})
    # a second file with one record that has no image (a bad record when images are asked for)
    w = ArrayRecordWriter(str(tmp_path / "z.array_record"), "group_size:1")
    for i, rec in enumerate(with_images(make_latents(4, flip=True, seed=1))):
        image = None if i == 1 else rec["image"]
        w.write(encode_latent_record(rec["mean"] + 100, rec["logvar"], rec["label"], rec["mean_flip"],
                                     rec["logvar_flip"], image=image))
    w.close()
    (tmp_path / "z.array_record.json").write_text(json.dumps(dict(meta, count=4)))

    c = cfg(source="latents", path=str(tmp_path / "*.array_record"), image_size=48, random_flip=True)

    def make():
        return make_train_iterator(c, global_batch=5, seed=3, process_index=0, process_count=1, with_images=True)

    it = make()
    assert it.element_spec["images"] == ((5, 6, 6, 3), np.dtype(np.uint8))
    batches = take(it, 11)  # 55 positions: about two epochs of 28 records, one of them bad
    from dit_jax.data import GlobalOrder

    order = GlobalOrder(28, 3)
    assert it.stats()["bad_records"] == sum(order.key(q) == 25 for q in range(55)) >= 1  # z's record 1 is key 25
    seen = set()
    for b in batches:
        assert b["images"].shape == (5, 6, 6, 3) and b["images"].dtype == np.uint8
        for x, image in zip(b["x"], b["images"]):
            rid = int(x[0, 0, 0])
            flipped = rid < 0
            rid = -1 - rid if flipped else rid
            if rid >= 100:  # the second file: the image's id channel restarts at 0
                assert int(image[0, 0, 0]) == rid - 100 and rid != 101
            else:
                assert int(image[0, 0, 0]) == rid
            marker_col = 5 if flipped else 0  # the image faces the way the moments do
            assert (image[:, marker_col, 1] == 255).all() and (image[:, 5 - marker_col, 1] == 0).all()
            seen.add((rid, flipped))
    assert any(f for _, f in seen) and any(not f for _, f in seen)
    # exact resume, images included, from inside a batch that lost a bad record
    for cut in (1, 3, 6):
        a = make()
        take(a, cut)
        state = json.loads(json.dumps(a.get_state()))
        assert state["images"] is True
        more = take(a, 4)
        b = make()
        b.set_state(state)
        for p, q in zip(more, take(b, 4)):
            for k in ("x", "y", "images"):
                np.testing.assert_array_equal(p[k], q[k])
    # without with_images the batches are as before, and a state from the images pipeline does not fit
    plain = make_train_iterator(c, global_batch=5, seed=3, process_index=0, process_count=1)
    assert set(next(plain)) == {"x", "y"}
    with pytest.raises(ValueError, match="images"):
        plain.set_state(state)
    # latents extracted without images cannot feed REPA
    write_latents(tmp_path / "noimg" / "a.array_record", make_latents(8), meta={})
    with pytest.raises(ValueError, match="--store-images"):
        make_train_iterator(cfg(source="latents", path=str(tmp_path / "noimg")), global_batch=4, seed=0,
                            process_index=0, process_count=1, with_images=True)


# ------------------------------------------------------------------------------------- resume, sharding
def _resume_check(make, n, cuts):
    bad_before = []
    for k in cuts:
        it = make()
        take(it, k)
        state = json.loads(json.dumps(it.get_state()))  # JSON round trip, as a checkpoint stores it
        assert state["position"] == k
        bad_before.append(it.stats()["bad_records"])
        a = take(it, n)
        it2 = make()
        it2.set_state(state)
        b = take(it2, n)
        assert_batches_equal(a, b)
        assert it2.stats()["bad_records"] == it.stats()["bad_records"]
    return bad_before


def test_exact_resume_across_epoch_boundary():
    c = cfg(source="digits", image_size=8, channels=1, random_flip=True, num_classes=10)

    def make():
        return make_train_iterator(c, global_batch=100, seed=3, process_index=0, process_count=1)

    # 17.97 batches per epoch: cut at 10, then 10 more cross the boundary; cut at 18, right after it
    _resume_check(make, 10, cuts=[10, 18])
    # epochs are reshuffled: the first 1700 examples of epoch 1 and of epoch 2 come in different orders
    it = make()
    xs = np.concatenate([b["x"] for b in take(it, 36)])
    e1, e2 = xs[:1700], xs[1797:3497]  # epoch 2 starts at position 1797
    assert not np.array_equal(e1, e2)
    # a state does not fit another seed
    other = make_train_iterator(c, global_batch=100, seed=4, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="seed"):
        other.set_state(it.get_state())


def test_exact_resume_with_bad_records(image_folder):
    c = cfg(source="folder", path=str(image_folder), image_size=8, channels=3, random_flip=True, num_classes=3)

    def make():
        return make_train_iterator(c, global_batch=4, seed=0, process_index=0, process_count=1)

    bad_before = _resume_check(make, 5, cuts=range(1, 9))
    assert 0 in bad_before and max(bad_before) > 0  # cuts before and after bad records were replaced


def test_exact_resume_with_workers():
    c = cfg(source="digits", image_size=8, channels=1, random_flip=True, num_classes=10, num_workers=2)

    def make():
        return make_train_iterator(c, global_batch=128, seed=0, process_index=0, process_count=1)

    it = make()
    take(it, 8)
    state = it.get_state()
    a = take(it, 10)  # crosses the epoch boundary (14 batches)
    it.close()
    it2 = make()
    it2.set_state(state)
    b = take(it2, 10)
    it2.close()
    assert_batches_equal(a, b)


def test_rows_of_any_topology_compose_the_same_global_batches(tmp_path):
    """The data depends on (data, seed, global batch) only: 1 process, 2 processes (blocks of rows), 4 processes
    and interleaved rows, with or without grain workers, see the same examples (flips included) at every step, and
    a state saved on one topology continues on another."""
    c = cfg(source="digits", image_size=8, channels=1, random_flip=True, num_classes=10)
    n = 30  # crosses the epoch boundary (1797 records, 64 a batch)

    def batches(**kw):
        return take(make_train_iterator(c, global_batch=64, seed=5, **kw), n)

    one = batches(process_index=0, process_count=1)
    for count in (2, 4):
        parts = [batches(process_index=p, process_count=count) for p in range(count)]
        for s in range(n):
            np.testing.assert_array_equal(np.concatenate([p[s]["x"] for p in parts]), one[s]["x"])
            np.testing.assert_array_equal(np.concatenate([p[s]["y"] for p in parts]), one[s]["y"])
    odd = batches(rows=range(1, 64, 2))  # a process whose devices hold every other row
    for s in range(n):
        np.testing.assert_array_equal(odd[s]["x"], one[s]["x"][1::2])
    flipped = [np.array_equal(a, b[:, ::-1]) and not np.array_equal(a, b) for a, b in zip(one[0]["x"], one[0]["x"])]
    assert not any(flipped)  # (sanity of the comparison below)
    workers = take(make_train_iterator(cfg(**dict(c.to_dict(), num_workers=2)), global_batch=64, seed=5, process_index=1,
                                       process_count=2), n)
    for s in range(n):
        np.testing.assert_array_equal(workers[s]["x"], one[s]["x"][32:])

    # a state saved by process 1 of 4 continues on 1 process (and the other way round)
    it = make_train_iterator(c, global_batch=64, seed=5, process_index=1, process_count=4)
    take(it, 7)
    state = json.loads(json.dumps(it.get_state()))
    assert state["position"] == 7 and "process_index" not in state
    whole = make_train_iterator(c, global_batch=64, seed=5, process_index=0, process_count=1)
    whole.set_state(state)
    assert_batches_equal(take(whole, 5), one[7:12])
    quarter = make_train_iterator(c, global_batch=64, seed=5, process_index=3, process_count=4)
    quarter.set_state(whole.get_state())
    np.testing.assert_array_equal(next(quarter)["x"], one[12]["x"][48:])
    # but not another global batch (the positions would mean other examples)
    with pytest.raises(ValueError, match="global_batch"):
        make_train_iterator(c, global_batch=32, seed=5, process_index=0, process_count=1).set_state(state)
    with pytest.raises(ValueError, match="rows"):
        make_train_iterator(c, global_batch=8, seed=5, rows=[0, 0, 1])


def test_state_of_the_per_process_order_still_resumes(caplog):
    """A checkpoint of an older dit-jax (per-process order, format v1) continues at its batch count."""
    c = cfg(source="digits", image_size=8, channels=1, random_flip=False, num_classes=10)
    it = make_train_iterator(c, global_batch=16, seed=0, process_index=0, process_count=1)
    old = dict(format="dit-jax-data-v1", grain="{}", skip=0, bad_records=0, bad_examples=[], batches=3,
               source="Permuted(DigitsSource(image_size=8, channels=1, len=1797), seed=0)", seed=0, process_index=0,
               process_count=1, local_batch=16, num_workers=0, images=False)
    with caplog.at_level(logging.WARNING, logger="dit_jax.data"):
        it.set_state(old)
    assert any("older dit-jax" in r.getMessage() for r in caplog.records)
    assert it.get_state()["position"] == 3
    with pytest.raises(ValueError, match="seed"):
        it.set_state(dict(old, seed=1))
