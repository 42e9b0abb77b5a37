"""The benchmark harness (dit-jax bench, bench/torch_reference.py), splash attention's guard and numerics, and the
device prefetcher. No timing assertions: speed is measured by the benchmarks (BENCHMARKS.md), not by tests."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dit_jax import cli
from dit_jax.data.prefetch import DevicePrefetch
from dit_jax.diffusion import create_diffusion
from dit_jax.models import DiT_models
from dit_jax.models.layers import attention
from dit_jax.models.splash import splash_attention, splash_supported
from dit_jax.perf.cli import load_torch_reference
from dit_jax.train.sharding import make_mesh


# ---------------------------------------------------------------------------------------------- torch reference
def test_torch_reference_hybrid_loss_equals_ours():
    """The benchmark's torch loss is the official hybrid loss: same per-example loss, mse and vb as ours for the
    same x0, t, noise and model output (t includes 0, the decoder-NLL branch)."""
    ref = load_torch_reference()
    rng = np.random.default_rng(0)
    b, h, w, c = 6, 4, 4, 4
    x0 = rng.uniform(-1, 1, (b, h, w, c)).astype(np.float32)
    noise = rng.standard_normal((b, h, w, c)).astype(np.float32)
    out = rng.standard_normal((b, h, w, 2 * c)).astype(np.float32)
    out[..., c:] = np.tanh(out[..., c:])
    t = np.array([0, 1, 17, 500, 998, 999], np.int32)

    ours = create_diffusion("").training_losses(
        lambda x_t, t, **kw: jnp.asarray(out), jnp.asarray(x0), jnp.asarray(t), noise=jnp.asarray(noise)
    )
    loss = ref.HybridLoss()
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    tt = torch.from_numpy(t.astype(np.int64))
    x_t = loss.q_sample(to_t(x0), tt, to_t(noise))
    theirs = loss(to_t(out), to_t(x0), x_t, tt, to_t(noise))
    for k in ("loss", "mse", "vb"):
        np.testing.assert_allclose(np.asarray(ours[k]), theirs[k].numpy(), rtol=2e-4, atol=1e-5, err_msg=k)


def test_torch_trainer_step_learns_and_updates_ema():
    ref = load_torch_reference()
    model = ref.diffusers_dit(depth=1, hidden_size=32, num_heads=2, patch_size=2, input_size=4, num_classes=5)
    trainer = ref.TorchTrainer(model, lr=1e-3, ema_decay=0.5)
    before = [p.detach().clone() for p in trainer.params]
    moments = torch.cat([torch.randn(4, 4, 4, 4), torch.full((4, 4, 4, 4), -6.0)], dim=1)
    loss = trainer.step(moments, torch.tensor([0, 1, 2, 3]))
    assert math.isfinite(loss)
    moved = [i for i, (a, p) in enumerate(zip(before, trainer.params)) if not torch.equal(a, p.detach())]
    assert moved, "AdamW changed no parameter"
    i = moved[0]  # EMA with decay 0.5 sits halfway between the old and new weights
    torch.testing.assert_close(trainer.ema[i], 0.5 * before[i] + 0.5 * trainer.params[i].detach())


# ---------------------------------------------------------------------------------------------- the harness
@pytest.mark.parametrize("mode", ["train", "sample"])
def test_bench_cli_smoke_side_by_side(mode, tmp_path, capsys):
    """Tiny config on the 8 simulated devices, then the torch reference in its own process; JSON lines out."""
    out = tmp_path / "bench.jsonl"
    argv = ["bench", mode, "--variant", "S/4", "--res", "64", "--batch", "8", "--steps", "2", "--warmup", "1",
            "--windows", "2", "--torch", "--json", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "ratio (dit-jax / pytorch, images/s)" in printed
    ours, theirs, ratio = [json.loads(line) for line in out.read_text().splitlines()]
    assert ours["impl"] == "dit-jax" and theirs["impl"] == "pytorch"
    assert ours["mode"] == theirs["mode"] == mode and ours["devices"] == 8
    assert ours["variant"] == theirs["variant"] == "S/4" and ours["batch"] == theirs["batch"] == 8
    for r in (ours, theirs):
        assert r["step_s"] > 0 and r["images_per_s"] > 0
        assert r["step_s_min"] <= r["step_s"] <= r["step_s_max"]
    assert ours["compile_s"] > 0 and ours["tflops_per_device"] > 0 and ours["mfu"] is None  # no CPU peak
    assert ours["memory_estimate_gib"] > 0
    assert ratio["ratio_images_per_s"] == pytest.approx(ours["images_per_s"] / theirs["images_per_s"])


def test_bench_rejects_bad_input():
    from dit_jax.perf.bench import BenchSpec, run_bench

    with pytest.raises(ValueError, match="unknown bench mode"):
        run_bench("infer", BenchSpec())
    with pytest.raises(ValueError, match="steps"):
        BenchSpec(steps=2, windows=5)
    with pytest.raises(ValueError, match="not divisible"):
        run_bench("train", BenchSpec(variant="S/8", res=64, batch=3, steps=1, windows=1))


# ---------------------------------------------------------------------------------------------- splash attention
def _qkv(b=2, t=256, h=2, d=64, seed=0):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.standard_normal((b, t, h, d)), jnp.float32) for _ in range(3))


def test_splash_kernel_matches_xla_attention_in_the_interpreter():
    """The TPU kernel, run by the Pallas interpreter on the CPU: outputs and gradients equal the XLA path."""
    q, k, v = _qkv()
    np.testing.assert_allclose(splash_attention(q, k, v, interpret=True), attention(q, k, v, "xla"), atol=2e-6)

    def grads(fn):
        return jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v))), argnums=(0, 1, 2))(q, k, v)

    for a, b in zip(grads(lambda *a: splash_attention(*a, interpret=True)), grads(lambda *a: attention(*a, "xla"))):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_splash_under_shard_map_over_the_batch_equals_one_device():
    """With the ambient mesh set, the kernel runs per device under shard_map over ('data', 'fsdp')."""
    q, k, v = _qkv(b=8, t=256, h=1, d=64, seed=1)
    mesh = make_mesh(-1, 1)
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    qs, ks, vs = (jax.device_put(a, sharding) for a in (q, k, v))
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v: splash_attention(q, k, v, interpret=True))(qs, ks, vs)
        text = jax.jit(lambda q, k, v: splash_attention(q, k, v, interpret=True)).lower(qs, ks, vs).as_text()
    assert "shard_map" in text or "sdy.manual_computation" in text
    np.testing.assert_allclose(out, attention(q, k, v, "xla"), atol=2e-6)


def test_splash_is_guarded_off_tpu_and_falls_back_on_short_sequences():
    assert not splash_supported(64, 64) and not splash_supported(256, 2) and splash_supported(256, 256)
    q, k, v = _qkv(b=1, t=16)
    np.testing.assert_array_equal(attention(q, k, v, "splash"), attention(q, k, v, "xla"))  # fallback
    model = DiT_models["DiT-S/2"](input_size=32, num_classes=4, rngs=nnx.Rngs(0), attn_impl="splash")  # 256 tokens
    x = jnp.zeros((1, 32, 32, 4))
    with pytest.raises(ValueError, match="needs a TPU"):
        model(x, jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))


# ---------------------------------------------------------------------------------------------- prefetch
class _Counter:
    """An iterator whose state is the number of items handed out, with transfers recorded."""

    def __init__(self, n: int):
        self.i, self.n = 0, n

    def __next__(self):
        if self.i >= self.n:
            raise StopIteration
        self.i += 1
        return {"x": np.full((2,), self.i - 1)}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetch_state_is_the_consumed_position(depth):
    puts = []

    def put(b):
        puts.append(int(b["x"][0]))
        return jax.device_put(b)

    src = _Counter(6)
    feed = DevicePrefetch(src, put, depth=depth)
    assert feed.get_state() == {"i": 0}
    got = [int(next(feed)["x"][0]) for _ in range(2)]
    assert got == [0, 1]
    assert feed.get_state() == {"i": 2}  # what a checkpoint stores: the prefetched batches are not consumed
    assert len(puts) == min(6, 2 + depth)  # batches already on the devices
    resumed = DevicePrefetch(_resume(feed.get_state()), jax.device_put, depth=depth)
    assert [int(b["x"][0]) for b in resumed] == [2, 3, 4, 5]
    assert [int(b["x"][0]) for b in feed] == [2, 3, 4, 5]
    with pytest.raises(ValueError):
        DevicePrefetch(_Counter(1), put, depth=-1)


def _resume(state):
    c = _Counter(6)
    c.set_state(state)
    return c


# ---------------------------------------------------------------------------------------------- splash in use
def _splash_model_cfg(attn_impl: str):
    from dit_jax.train.config_schema import base_config

    # 16x16 latents with patch 1: 256 tokens, the shortest sequence splash takes
    cfg = base_config().model
    cfg.update(dict(variant="S/2", depth=1, hidden_size=32, num_heads=2, patch_size=1, input_size=16, in_channels=1,
                    num_classes=4, attn_impl=attn_impl, scan_blocks=True))
    return cfg


def test_train_step_with_splash_on_8_devices_equals_xla(monkeypatch):
    """The trainer's step with attn_impl=splash (kernel in the interpreter, shard_map over the 8-device mesh
    as the trainer sets it up) gives the XLA path's loss and parameters."""
    from dit_jax.train.config_schema import base_config
    from dit_jax.train.optim import make_optimizer
    from dit_jax.models.splash import mesh_context
    from dit_jax.train.sharding import batch_sharding, param_shardings
    from dit_jax.train.state import init_state
    from dit_jax.train.step import make_train_step

    monkeypatch.setenv("DIT_JAX_SPLASH_INTERPRET", "1")
    mesh = make_mesh(-1, 1)
    optim_cfg = base_config().optim
    optim_cfg.update(dict(lr=1e-3, ema_decay=0.9))
    optimizer = make_optimizer(optim_cfg)
    rng = np.random.default_rng(0)
    local = dict(x=rng.standard_normal((8, 16, 16, 1)).astype(np.float32), y=rng.integers(0, 4, 8).astype(np.int32))
    results = {}
    for impl in ("xla", "splash"):
        cfg = _splash_model_cfg(impl)
        graphdef, state = init_state(cfg, optimizer, 0)
        state = jax.device_put(state, param_shardings(state, mesh, fsdp=False))
        batch = jax.device_put(local, batch_sharding(mesh))
        step = jax.jit(make_train_step(graphdef, create_diffusion(""), optimizer))
        with mesh_context(mesh, impl):
            text = step.lower(state, batch).as_text()
            state, metrics = step(state, batch)
        results[impl] = (jax.device_get(metrics), jax.device_get(state["params"]), text)
    assert "sdy.manual_computation" in results["splash"][2] or "shard_map" in results["splash"][2]
    np.testing.assert_allclose(results["splash"][0]["loss"], results["xla"][0]["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(results["splash"][1]), jax.tree.leaves(results["xla"][1])):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_sampler_with_splash_on_8_devices_equals_xla(monkeypatch):
    from dit_jax.sampling import SampleSettings, Sampler, example_keys
    from dit_jax.train.state import build_model

    monkeypatch.setenv("DIT_JAX_SPLASH_INTERPRET", "1")
    ref = build_model(_splash_model_cfg("xla"), seed=3)
    # random weights everywhere (adaLN-Zero would make the attention irrelevant at init)
    graphdef, params, rest = nnx.split(ref, nnx.Param, ...)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [0.05 * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)])
    nnx.update(ref, params)
    fast = build_model(_splash_model_cfg("splash"), seed=3)
    nnx.update(fast, nnx.state(ref))
    settings = SampleSettings(num_steps=2, cfg_scale=2.0, cfg_channels=None)
    labels = np.arange(8) % 4
    keys = example_keys(0, range(8))
    out = {impl: np.asarray(Sampler(m, settings)(labels, keys)) for impl, m in (("xla", ref), ("splash", fast))}
    np.testing.assert_allclose(out["splash"], out["xla"], rtol=1e-5, atol=1e-5)
    assert np.abs(out["xla"]).max() > 0.1
