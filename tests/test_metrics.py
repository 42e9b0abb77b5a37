"""dit_jax.train.metrics (the JSONL + TensorBoard writer, images, Progress), dit_jax.train.chart (the matplotlib loss
chart) and dit_jax.perf.mfu (peak FLOP/s, MFU)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from dit_jax.perf.mfu import mfu, peak_flops_per_device
from dit_jax.train.chart import plot_loss
from dit_jax.train.metrics import MetricWriter, Progress, format_metrics, read_jsonl


def read_events(tb_dir: Path) -> list[event_pb2.Event]:
    """Every event of every event file under tb_dir (TFRecord framing: u64 length, u32 crc, data, u32 crc)."""
    events = []
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length]))
            pos += 12 + length + 4
    return events


def scalars_in(events) -> dict[tuple[str, int], float]:
    return {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value if v.HasField("simple_value")}


@pytest.fixture
def fake_gcs(monkeypatch):
    """gs:// (and gcsfs' "gcs") served by an in-memory fsspec file system: what etils.epath reaches on a TPU VM
    through gcsfs, without a network."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class FakeGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")
        store: dict = {}
        pseudo_dirs = [""]

    import sys

    fsspec_registry = sys.modules["fsspec.registry"]  # the module (the package's `registry` is a read-only view)
    for name in ("gs", "gcs"):  # registered implementations live in fsspec's module-level dict: restore it after
        if name in fsspec_registry._registry:  # noqa: SLF001
            monkeypatch.setitem(fsspec_registry._registry, name, fsspec_registry._registry[name])  # noqa: SLF001
        else:
            monkeypatch.setitem(fsspec_registry._registry, name, FakeGCS)  # noqa: SLF001
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    yield FakeGCS.store


def test_remote_workdir_logs_are_staged_locally_and_copied(tmp_path, monkeypatch, fake_gcs):
    """A gs:// workdir: files are written in the local staging folder and copied on flush/close (and when
    sync_every_s has passed); a writer on a new machine (another staging folder) appends to the copied log."""
    from etils import epath

    monkeypatch.setenv("DIT_JAX_LOCAL_LOGS", str(tmp_path / "vm1"))
    w = MetricWriter("gs://bucket/runs/a", sync_every_s=3600)
    assert w.local_dir == tmp_path / "vm1" / "gs" / "bucket" / "runs" / "a"
    w.write_scalars(1, {"loss": 1.0})
    assert not epath.Path("gs://bucket/runs/a/metrics.jsonl").exists()  # not yet: sync_every_s
    w.write_images(1, "grid", np.zeros((4, 4, 3), np.uint8))
    w.flush()
    assert read_jsonl_remote("gs://bucket/runs/a/metrics.jsonl") == [{"step": 1, "loss": 1.0}]
    assert epath.Path("gs://bucket/runs/a/samples/grid_0000001.png").exists()
    assert any(k.startswith("gs://bucket/runs/a/tb/events.out.tfevents") for k in fake_gcs)
    w.write_scalars(2, {"loss": 0.5})
    w.close()
    assert [r["step"] for r in read_jsonl_remote("gs://bucket/runs/a/metrics.jsonl")] == [1, 2]
    # a resume on another machine: the remote log is fetched first, then appended to
    monkeypatch.setenv("DIT_JAX_LOCAL_LOGS", str(tmp_path / "vm2"))
    with MetricWriter("gs://bucket/runs/a", sync_every_s=0) as w2:
        w2.write_scalars(3, {"loss": 0.25})  # sync_every_s=0: copied at once
        assert [r["step"] for r in read_jsonl_remote("gs://bucket/runs/a/metrics.jsonl")] == [1, 2, 3]
    # other hosts write nothing, remote or not
    MetricWriter("gs://bucket/runs/b", enabled=False).write_scalars(1, {"loss": 1.0})
    assert not any(k.startswith("gs://bucket/runs/b") for k in fake_gcs)


def read_jsonl_remote(url: str) -> list[dict]:
    from etils import epath

    return [json.loads(line) for line in epath.Path(url).read_text().splitlines()]


def test_writer_writes_jsonl_and_tensorboard_scalars(tmp_path):
    with MetricWriter(tmp_path) as w:
        w.write_scalars(10, {"loss": jnp.float32(0.5), "lr": np.float64(1e-4), "tokens": np.int64(7)})
        w.write_scalars(20, {"loss": 0.25, "nan_seen": float("nan")})
        assert read_jsonl(tmp_path / "metrics.jsonl")[0] == {"step": 10, "loss": 0.5, "lr": 1e-4, "tokens": 7}  # flushed
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [10, 20] and math.isnan(records[1]["nan_seen"])
    assert isinstance(records[0]["tokens"], int)
    scalars = scalars_in(read_events(tmp_path / "tb"))
    assert scalars[("loss", 10)] == pytest.approx(0.5) and scalars[("loss", 20)] == pytest.approx(0.25)
    assert scalars[("lr", 10)] == pytest.approx(1e-4)

    # a second writer (a resumed run) appends to the JSONL and adds an event file
    with MetricWriter(tmp_path) as w:
        w.write_scalars(30, {"loss": 0.125})
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [10, 20, 30]
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) >= 1
    assert scalars_in(read_events(tmp_path / "tb"))[("loss", 30)] == pytest.approx(0.125)
    with pytest.raises(ValueError, match="not a scalar"):
        MetricWriter(tmp_path / "x").write_scalars(1, {"loss": np.zeros(3)})


def test_writer_images_land_as_pngs_and_in_tensorboard(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)
    with MetricWriter(tmp_path) as w:
        p1 = w.write_images(500, "samples/ema", rgb)
        p2 = w.write_images(1000, "digits", gray)
        with pytest.raises(ValueError, match="uint8"):
            w.write_images(1, "bad", rgb.astype(np.float32))
    assert p1 == tmp_path / "samples" / "samples_ema_0000500.png"
    assert p2 == tmp_path / "samples" / "digits_0001000.png"
    np.testing.assert_array_equal(np.asarray(Image.open(p1)), rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(p2)), gray[..., 0])
    images = {(v.tag, e.step): v.image for e in read_events(tmp_path / "tb") for v in e.summary.value if v.HasField("image")}
    assert images[("samples/ema", 500)].width == 40 and images[("samples/ema", 500)].height == 24
    assert not list((tmp_path / "samples").glob(".*"))  # no temporary files left behind


def test_disabled_writer_does_nothing(tmp_path):
    w = MetricWriter(tmp_path / "run", enabled=False)
    w.write_scalars(1, {"loss": 1.0})
    assert w.write_images(1, "x", np.zeros((4, 4, 3), np.uint8)) is None
    w.flush()
    w.close()
    assert not (tmp_path / "run").exists()


def test_read_jsonl_skips_a_truncated_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    assert read_jsonl(path) == []
    path.write_text('{"step": 1, "loss": 1.0}\n\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    assert read_jsonl(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(json.JSONDecodeError):
        read_jsonl(path)


def test_plot_loss_draws_a_chart(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    rng = np.random.default_rng(0)
    with MetricWriter(tmp_path) as w:
        for step in range(0, 2000, 10):
            loss = 0.15 + 0.8 * math.exp(-step / 300) + 0.02 * rng.standard_normal()
            w.write_scalars(step, {"loss": loss, "mse": loss * 0.9})
        w.write_scalars(2000, {"grad_norm": 1.0})  # a record without the plotted key
    png = plot_loss(jsonl, tmp_path / "plots" / "loss.png", keys=("loss", "mse"), size=(640, 400))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # a real PNG file, whole
    with Image.open(png) as opened:
        assert opened.format == "PNG" and opened.size == (640, 400)
        opened.verify()
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape == (400, 640, 3)
    background = np.all(img == 255, axis=-1)
    assert 0.03 < (~background).mean() < 0.6  # axes, text and curves; not a blank or filled image
    blue = np.all(img == (31, 119, 180), axis=-1)  # the smoothed curve of the first key
    red = np.all(img == (214, 39, 40), axis=-1)
    assert blue.sum() > 500 and red.sum() > 500
    # the smoothed loss falls: its pixels are higher (smaller row) on the left than on the right
    cols = np.nonzero(blue.any(axis=0))[0]
    left_row = np.nonzero(blue[:, cols[5]])[0].mean()
    right_row = np.nonzero(blue[:, cols[-5]])[0].mean()
    assert left_row < right_row - 100
    assert not list((tmp_path / "plots").glob(".*"))

    # no data yet: still a valid image; log scale works
    empty = np.asarray(Image.open(plot_loss(tmp_path / "missing.jsonl", tmp_path / "empty.png")).convert("L"))
    assert empty.shape == (480, 800) and (empty < 255).any()
    log = np.asarray(Image.open(plot_loss(jsonl, tmp_path / "log.png", log_y=True)).convert("RGB"))
    assert np.all(log == (31, 119, 180), axis=-1).sum() > 500


def test_plot_loss_follows_the_data(tmp_path):
    """The chart is drawn from the data: a rising loss draws a rising curve, other values another image, the log
    scale another; rewriting the PNG replaces it (no temporary files left beside it)."""

    def chart(name: str, losses: list[float], **kw) -> np.ndarray:
        jsonl = tmp_path / f"{name}.jsonl"
        jsonl.write_text("".join(json.dumps({"step": 10 * i, "loss": v}) + "\n" for i, v in enumerate(losses)))
        return np.asarray(Image.open(plot_loss(jsonl, tmp_path / "loss.png", size=(480, 320), title="t", **kw))
                          .convert("RGB"))

    def blue_rows(img: np.ndarray) -> tuple[float, float]:
        """Mean row of the first key's smoothed curve near its left and right ends."""
        blue = np.all(img == (31, 119, 180), axis=-1)
        cols = np.nonzero(blue.any(axis=0))[0]
        assert blue.sum() > 300 and len(cols) > 100
        return np.nonzero(blue[:, cols[5]])[0].mean(), np.nonzero(blue[:, cols[-40]])[0].mean()

    falling = chart("falling", [1.0 / (1 + 0.05 * i) for i in range(200)])
    rising = chart("rising", [0.1 + 0.004 * i for i in range(200)])
    assert falling.shape == rising.shape == (320, 480, 3)
    left, right = blue_rows(falling)
    assert left < right - 60  # falls: higher on the left
    left, right = blue_rows(rising)
    assert left > right + 60  # rises: lower on the left
    assert (falling != rising).any(axis=-1).mean() > 0.01
    same = chart("falling", [1.0 / (1 + 0.05 * i) for i in range(200)])
    np.testing.assert_array_equal(same, falling)  # deterministic: the same data draws the same pixels
    log = chart("falling", [1.0 / (1 + 0.05 * i) for i in range(200)], log_y=True)
    assert (log != falling).any(axis=-1).mean() > 0.01
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".png" or p.name.startswith(".")) == ["loss.png"]
    with pytest.raises(ValueError, match="size"):
        plot_loss(tmp_path / "falling.jsonl", tmp_path / "bad.png", size=(10, 10))
    assert not (tmp_path / "bad.png").exists()


def test_plot_loss_draws_the_sample_quality_beside_the_loss(tmp_path):
    """train.eval_every's metrics (logged now and then, in rows of their own) in a right-hand panel, each key on
    its own axis: a falling FD (blue) and a rising accuracy (red) drawn falling and rising; none logged: no panel."""
    jsonl = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / (1 + 0.01 * s)} for s in range(10, 1010, 10)]
    rows += [{"step": s, "digits_fd": 50.0 - 0.04 * s, "digits_accuracy": 0.1 + 0.0008 * s}
             for s in range(100, 1100, 100)]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    img = np.asarray(Image.open(plot_loss(jsonl, tmp_path / "loss.png", side_keys=("digits_fd", "digits_accuracy")))
                     .convert("RGB"))
    assert img.shape == (480, 1280, 3)
    right = img[:, 800:]  # the quality panel (3:2 widths)
    blue, red = (np.all(right == c, axis=-1) for c in ((31, 119, 180), (214, 39, 40)))
    assert blue.sum() > 300 and red.sum() > 300

    def rows_at_ends(mask: np.ndarray) -> tuple[float, float]:
        cols = np.nonzero(mask.sum(axis=0) > 1)[0]
        return np.nonzero(mask[:, cols[3]])[0].mean(), np.nonzero(mask[:, cols[-3]])[0].mean()

    left, end = rows_at_ends(blue)
    assert left < end - 100  # the FD falls
    left, end = rows_at_ends(red)
    assert left > end + 100  # the accuracy rises, on its own scale (0.18 to 0.9, not squashed under the FD's)
    plain = np.asarray(Image.open(plot_loss(jsonl, tmp_path / "plain.png")).convert("RGB"))
    assert plain.shape == (480, 800, 3)  # without side keys: the loss alone
    none = tmp_path / "none.jsonl"
    none.write_text("".join(json.dumps(r) + "\n" for r in rows if "loss" in r))
    assert Image.open(plot_loss(none, tmp_path / "n.png", side_keys=("digits_fd",))).size == (800, 480)


def test_peak_flops_and_mfu():
    cpu = jax.devices("cpu")[0]
    assert peak_flops_per_device(cpu) is None
    assert peak_flops_per_device("cpu") is None
    assert peak_flops_per_device("TPU v3") == 61.5e12  # per TensorCore = per JAX device
    assert peak_flops_per_device("TPU v4") == 275e12
    assert peak_flops_per_device("TPU v5 lite") == 197e12
    assert peak_flops_per_device("TPU v5p") == peak_flops_per_device("TPU v5") == 459e12
    assert peak_flops_per_device("TPU v6 lite") == 918e12
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_per_device("NVIDIA H200") == 989.4e12
    assert peak_flops_per_device("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_per_device("NVIDIA L4") == 121e12
    assert peak_flops_per_device("NVIDIA L40S") is None  # unknown, not mistaken for an L4
    assert mfu(2 * 989.4e12, 1.0, 4, 989.4e12) == pytest.approx(0.5)
    assert mfu(1e12, 1.0, 1, None) is None and mfu(1e12, 0.0, 1, 1e12) is None


def test_format_metrics():
    text = format_metrics({"step": 400000, "loss": 0.1234567, "lr": 1e-4, "steps_per_s": 5.7123, "tok": 12345.6,
                           "x": jnp.float32(2.0), "bad": float("nan")})
    assert text == "step=400000 loss=0.1235 lr=1.000e-04 steps_per_s=5.712 tok=12345.6 x=2 bad=nan"


def test_progress_runs_without_a_tty(capsys):
    with Progress(100, initial=10, enabled=True) as bar:
        bar.update(50, {"loss": 0.25})
        bar.update(50)  # same step: no error
        bar.write("a log line")
        assert bar.n == 50
        bar.update(100, {"loss": 0.125})
    err = capsys.readouterr().err
    assert "loss=0.125" in err and "a log line" in err and "100/100" in err

    import ipykernel  # noqa: F401: imported (as nbclient's notebook test does) is not running in a notebook

    quiet = Progress(10)  # enabled=None: off when stderr is not a terminal (as under pytest) nor a notebook
    quiet.update(5, {"loss": 1.0})
    quiet.close()
    assert capsys.readouterr().err == ""
