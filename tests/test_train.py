"""Trainer: one step on 8 devices == 1 device (with and without FSDP), exact resume after SIGKILL, NaN guard."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from dit_jax.diffusion import create_diffusion
from dit_jax.train.config_schema import base_config
from dit_jax.train.optim import ema_params, make_optimizer
from dit_jax.train.sharding import make_mesh, param_shardings, shard_batch
from dit_jax.train.state import abstract_state, init_state
from dit_jax.train.step import make_train_step

REPO = Path(__file__).resolve().parents[1]


def tiny_model_cfg(**kw):
    """config.model from the schema: a tiny DiT-S/2 (depth 2, width 64) on 8x8x1 inputs, 10 classes."""
    cfg = base_config().model
    cfg.update(dict(variant="S/2", depth=2, hidden_size=64, num_heads=4, patch_size=2, input_size=8, in_channels=1,
                    num_classes=10))
    cfg.update(kw)
    return cfg


def optim_cfg():
    cfg = base_config().optim
    cfg.update(dict(lr=1e-3, ema_decay=0.9))
    return cfg


def one_step(mesh, fsdp: bool, model_cfg, latent: bool = False):
    optimizer = make_optimizer(optim_cfg())
    graphdef, abstract = abstract_state(model_cfg, optimizer, seed=0)
    shardings = param_shardings(abstract, mesh, fsdp=fsdp)
    state = jax.jit(lambda: init_state(model_cfg, optimizer, 0)[1], out_shardings=shardings)()
    rng = np.random.default_rng(0)
    c = model_cfg.in_channels * (2 if latent else 1)
    local = dict(x=rng.standard_normal((16, 8, 8, c)).astype(np.float32), y=rng.integers(0, 10, 16).astype(np.int32))
    batch = shard_batch(local, mesh)
    step = make_train_step(graphdef, create_diffusion(""), optimizer, latent_scale=0.18215 if latent else None)
    step = jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=(0,))
    for _ in range(2):
        state, metrics = step(state, batch)
    return jax.device_get(state), jax.device_get(metrics), state


@pytest.mark.parametrize("fsdp", [False, True])
def test_one_step_on_8_devices_equals_1_device(fsdp):
    assert jax.device_count() == 8
    cfg = tiny_model_cfg(hidden_size=128)  # leaves big enough to be FSDP-sharded
    ref_state, ref_m, _ = one_step(make_mesh(devices=jax.devices()[:1]), False, cfg)
    mesh8 = make_mesh(data=2, fsdp=4) if fsdp else make_mesh()
    state, m, live = one_step(mesh8, fsdp, cfg)
    if fsdp:  # really sharded: a block kernel is split over the fsdp axis
        qkv = live["params"]["blocks"][0]["attn"]["qkv"]["kernel"]
        assert "fsdp" in str(qkv.sharding.spec) and len(qkv.addressable_shards) == 8
        assert qkv.addressable_shards[0].data.shape[1] == qkv.shape[1] // 4
    for k in ("loss", "mse", "vb", "grad_norm"):
        np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-6, atol=1e-7)
    flat_ref = jax.tree.leaves(ref_state["params"])
    flat = jax.tree.leaves(state["params"])
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(flat, flat_ref)) < 1e-6
    ema, ema_ref = ema_params(state["opt_state"]), ema_params(ref_state["opt_state"])
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(ema_ref))) < 1e-6
    assert int(state["step"]) == 2


def test_step_learns_and_latent_path_samples_fresh_latents():
    cfg = tiny_model_cfg(in_channels=4)
    s1, m1, _ = one_step(make_mesh(), False, cfg, latent=True)
    assert np.isfinite(m1["loss"]) and m1["loss"] > 0 and "vb" in m1
    # the EMA moved away from the params' start but not as far as the params (decay 0.9 over 2 steps). The
    # final linear moves from step 1 (block weights behind zero gates only from step 3, adaLN-Zero).
    p0 = jax.device_get(init_state(cfg, make_optimizer(optim_cfg()), 0)[1]["params"])
    k = lambda t: np.asarray(t["final_layer"]["linear"]["kernel"])
    ema = ema_params(s1["opt_state"])
    assert 0 < np.abs(k(ema) - k(p0)).max() < np.abs(k(s1["params"]) - k(p0)).max()


def _train_cmd(workdir: Path, steps: int, ckpt_every: int) -> list[str]:
    return [
        sys.executable, "-m", "dit_jax.cli", "train", "--config", str(REPO / "configs" / "digits.py"),
        "--workdir", str(workdir),
        f"--config.train.steps={steps}", f"--config.train.ckpt_every={ckpt_every}", "--config.train.log_every=1",
        "--config.train.global_batch=16", "--config.train.sample_every=0",
        "--config.model.depth=2", "--config.model.hidden_size=64", "--config.model.num_heads=4",
        "--config.model.patch_size=4",
    ]


def _final_state(workdir: Path):
    from dit_jax.train.checkpoint import Checkpointer

    ckpt = Checkpointer(workdir / "checkpoints")
    step = ckpt.latest_step()
    # restore without a target: raw arrays are enough to compare
    restored = ckpt.restore(None, step=step)
    ckpt.close()
    return restored


@pytest.mark.slow
def test_exact_resume_after_sigkill(tmp_path):
    n = 3
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    r = subprocess.run(_train_cmd(straight, 2 * n, n), env=env, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(_train_cmd(killed, 2 * n, n), env=dict(env, DIT_JAX_FAULT_AFTER_STEP=str(n)), cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    r = subprocess.run(_train_cmd(killed, 2 * n, n), env=env, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from step {n}" in r.stdout

    a, b = _final_state(straight), _final_state(killed)
    assert a.step == b.step == 2 * n
    for name in ("params", "opt_state", "rng", "step"):
        la, lb = jax.tree.leaves(a.state[name]), jax.tree.leaves(b.state[name])
        assert len(la) == len(lb) > 0
        for x, y in zip(la, lb):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # the data iterator is at the same place: the next batch is identical
    assert a.data_state == b.data_state
    saved = a.data_state if isinstance(a.data_state, dict) else json.loads(a.data_state)
    assert saved["position"] == 2 * n  # the consumed position: batches prefetched to the devices are not counted
    from dit_jax.data import make_train_iterator
    from dit_jax.train.config_load import config_from_dict

    cfg = config_from_dict(a.config)
    batches = []
    for st in (a.data_state, b.data_state):
        it = make_train_iterator(cfg.data, global_batch=16, seed=cfg.seed)
        it.set_state(st)
        batches.append(next(it))
    np.testing.assert_array_equal(batches[0]["x"], batches[1]["x"])
    np.testing.assert_array_equal(batches[0]["y"], batches[1]["y"])


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from dit_jax.train import loop
    from dit_jax.train.config_load import load_config

    real = loop.make_train_iterator

    class Poisoned:
        """Real digits batches, NaNs from the 5th batch on."""

        def __init__(self, *a, **k):
            self.it, self.n = real(*a, **k), 0

        def __next__(self):
            b = next(self.it)
            self.n += 1
            if self.n >= 5:
                b = dict(b, x=np.full_like(b["x"], np.nan))
            return b

        def get_state(self):
            return self.it.get_state()

        def set_state(self, s):
            self.it.set_state(s)

        def stats(self):
            return self.it.stats()

    monkeypatch.setattr(loop, "make_train_iterator", Poisoned)
    cfg = load_config(str(REPO / "configs" / "digits.py"), [
        "train.steps=8", "train.ckpt_every=2", "train.log_every=2", "train.global_batch=16", "train.sample_every=0",
        "model.depth=1", "model.hidden_size=32", "model.num_heads=2", "model.patch_size=4",
    ])
    with pytest.raises(FloatingPointError, match="newest checkpoint that verifies is step 4"):
        loop.train(cfg, tmp_path)
    from dit_jax.train.checkpoint import Checkpointer

    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 4


@pytest.mark.slow
def test_sigterm_saves_current_step_and_resume_continues(tmp_path):
    import time

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1")
    cmd = _train_cmd(tmp_path, 100_000, 100_000)  # no periodic checkpoint: only the preemption save
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # wait until a few steps are logged (log_every=1), then preempt
    deadline = time.time() + 240
    while time.time() < deadline:
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines() if (tmp_path / "metrics.jsonl").exists() else []
        if len(lines) >= 3:
            break
        time.sleep(0.2)
    assert len(lines) >= 3, "training did not start"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert "preempted at step" in out
    saved = int(out.split("SIGTERM: saved step ")[1].split()[0])
    assert saved >= 3
    from dit_jax.train.checkpoint import Checkpointer

    assert Checkpointer(tmp_path / "checkpoints").latest_step() == saved
    r = subprocess.run(_train_cmd(tmp_path, saved + 2, 100_000), env=env, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from step {saved}" in r.stdout and f"done at step {saved + 2}" in r.stdout


def test_periodic_ema_sample_grids_quality_and_logs(tmp_path):
    from PIL import Image

    from dit_jax.train.config_load import load_config
    from dit_jax.train.loop import train
    from dit_jax.train.metrics import read_jsonl

    overrides = [
        "train.steps=4", "train.sample_every=2", "train.sample_steps=3", "train.sample_per_class=2",
        "train.sample_num_classes=3", "train.log_every=2", "train.global_batch=8", "train.ckpt_every=2",
        "train.eval_every=2", "train.eval_num_samples=12", "model.depth=1", "model.hidden_size=32",
        "model.num_heads=2",
    ]
    out = train(load_config(str(REPO / "configs" / "digits.py"), overrides), tmp_path)
    grids = sorted((tmp_path / "samples").glob("ema_samples_*.png"))
    assert [g.name for g in grids] == ["ema_samples_0000002.png"]  # every 2 steps, not at the final step
    img = np.asarray(Image.open(grids[0]))
    assert img.shape[:2] == (3 * 18 + 2, 2 * 18 + 2)  # 3 rows (classes) x 2 samples, 16 px tiles, 2 px padding
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4]
    for k in ("loss", "mse", "vb", "grad_norm", "images_per_s", "steps_per_s", "tflops_per_device"):
        assert np.isfinite(train_rows[-1][k])
    assert (tmp_path / "loss.png").exists() and list((tmp_path / "tb").iterdir())
    assert out["status"] == "done" and out["step"] == 4

    # the sample quality of train.eval_every: at every 2nd step, the final one included, in its own rows
    quality = [r for r in rows if "digits_fd" in r]
    assert [r["step"] for r in quality] == [2, 4]
    for r in quality:
        assert set(r) == {"step", "digits_fd", "digits_accuracy", "eval_seconds"}
        assert r["digits_fd"] > 0 and 0 <= r["digits_accuracy"] <= 1
    # it is the score of these samples: 12 EMA samples of labels 0..9, 0, 1 with the evaluation's fixed noise
    from dit_jax.evaluate.digits_classifier import digits_fd
    from dit_jax.train.optim import ema_params
    from dit_jax.train.samples import EVAL_SEED, draw
    from dit_jax.images import to_uint8

    cfg = load_config(str(REPO / "configs" / "digits.py"), overrides)
    labels = np.arange(12) % 10
    x = draw(out["graphdef"], ema_params(out["state"]["opt_state"]), out["state"]["rest"], cfg, labels,
              jax.random.key(EVAL_SEED), 8)
    assert digits_fd(to_uint8(np.clip(x, -1, 1)), 16)["digits_fd"] == pytest.approx(quality[-1]["digits_fd"],
                                                                                      rel=1e-6)
    # the quality panel beside the loss
    assert Image.open(tmp_path / "loss.png").size == (1280, 480)

    # a resumed run keeps the history and adds to it
    out = train(load_config(str(REPO / "configs" / "digits.py"), ["train.steps=6", *overrides[1:]]),
                tmp_path)
    assert out["step"] == 6
    quality = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "digits_fd" in r]
    assert [r["step"] for r in quality] == [2, 4, 6]
    assert tensorboard_steps(tmp_path / "tb", "digits_fd") == [2, 4, 6]


def tensorboard_steps(folder: Path, tag: str) -> list[int]:
    """The steps at which the event files under `folder` hold scalar `tag` (TFRecord framing: u64 length, u32
    crc, the Event proto, u32 crc; read with tensorboardX's proto definitions)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    steps = []
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return sorted(steps)

