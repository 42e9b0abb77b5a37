"""The benchmark harness (dit-jax bench, bench/torch_reference.py), splash attention's guard and numerics, and the
device prefetcher. No timing assertions: speed is measured by the benchmarks (BENCHMARKS.md), not by tests."""

from __future__ import annotations

import json
import math
import sys

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


def test_official_reference_is_the_transcription_with_both_attentions():
    """The benchmark's official model is tests/official_dit_torch.py's OfficialDiT (same keys as the parity tests'
    model); timm's fused attention (scaled_dot_product_attention) and its explicit path give the same output."""
    from official_dit_torch import OfficialDiT, randomize_torch

    ref = load_torch_reference()
    kw = dict(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=4, num_classes=5)
    fused = randomize_torch(ref.official_dit(**kw, fused_attn=True), 0)
    math_ = ref.official_dit(**kw, fused_attn=False).eval()
    math_.load_state_dict(fused.state_dict())
    assert isinstance(fused, ref.official_module().OfficialDiT)
    assert set(fused.state_dict()) == set(OfficialDiT(depth=2, hidden_size=32, num_heads=2, input_size=4).state_dict())
    x, t, y = torch.randn(3, 4, 4, 4), torch.tensor([0, 10, 999]), torch.tensor([0, 4, 5])
    with torch.no_grad():
        torch.testing.assert_close(fused(x, t, y), math_(x, t, y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["official", "diffusers"])
def test_torch_trainer_step_learns_and_updates_ema_as_train_py(impl):
    """One iteration moves the weights (AdamW) and the EMA is train.py's update_ema: with decay 0.5 every EMA
    parameter sits halfway between the old and the new weights."""
    ref = load_torch_reference()
    model, forward = ref.build_model(impl, depth=1, hidden_size=32, num_heads=2, patch_size=2, input_size=4,
                                     num_classes=5)
    trainer = ref.TorchTrainer(model, forward, lr=1e-3, ema_decay=0.5)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    moments = torch.cat([torch.randn(4, 4, 4, 4), torch.full((4, 4, 4, 4), -6.0)], dim=1)
    loss = trainer.step(moments, torch.tensor([0, 1, 2, 3]))
    assert math.isfinite(loss)
    after = dict(model.named_parameters())
    moved = [k for k in before if not torch.equal(before[k], after[k].detach())]
    assert moved, "AdamW changed no parameter"
    ema = dict(trainer.ema.named_parameters())
    assert not any(p.requires_grad for p in ema.values())
    for k in before:
        torch.testing.assert_close(ema[k], 0.5 * before[k] + 0.5 * after[k].detach())


@pytest.mark.parametrize("impl", ["official", "official-math", "diffusers"])
def test_torch_reference_sampling_forward_is_guided(impl):
    """The reference's sampling call on B = 2 images: the official forward_with_cfg returns its 2B rows (the guided
    eps twice), the diffusers wrapper B rows; 2C channels either way."""
    ref = load_torch_reference()
    run, info = ref.prepare("sample", "S/8", batch=2, res=64, impl=impl, num_classes=10)
    out = run()
    assert out.shape == ((2 if impl == "diffusers" else 4), 8, 8, 8) and torch.isfinite(out).all()
    assert info["reference"] == impl and info["mode"] == "sample"


# ---------------------------------------------------------------------------------------------- the harness
def _fake_worker(seconds_per_call: float, fail_on_window: bool = False, hang_on_window: bool = False) -> list[str]:
    """A process that speaks the worker protocol and reports a fixed time (no jax, no torch)."""
    code = (
        "import json, sys, time\n"
        "say = lambda **m: print('@@bench ' + json.dumps(m), flush=True)\n"
        "print('library noise on stdout', flush=True)\n"
        "say(event='ready', info=dict(batch=4, mode='train'))\n"
        "for line in sys.stdin:\n"
        "    if line.split()[0] == 'quit':\n"
        "        break\n"
        f"    if {fail_on_window}:\n"
        "        sys.exit('fake failure')\n"
        f"    if {hang_on_window}:\n"
        "        time.sleep(600)\n"
        f"    say(event='window', seconds_per_call={seconds_per_call}, cpu_s_per_call={seconds_per_call})\n"
        "say(event='done', info={})\n"
    )
    return [sys.executable, "-c", code]


def test_interleaved_workers_give_per_round_ratios_and_spread():
    from dit_jax.perf.bench import Worker, interleave, ratio_stats, summarise

    with Worker("ours", _fake_worker(0.5), timeout=60) as ours, Worker("ref", _fake_worker(2.0), timeout=60) as ref:
        times = interleave([ours, ref], rounds=3, calls=2, pause_s=0.0)
        assert ours.close() == {} and ref.close() == {}
    assert times == {"ours": [0.5] * 3, "ref": [2.0] * 3}
    assert ours.proc.returncode == 0 and ref.proc.returncode == 0
    stats = ratio_stats(times["ref"], times["ours"])
    assert stats["per_round"] == [4.0] * 3 and stats["median"] == stats["min"] == stats["max"] == 4.0
    assert stats["rounds"] == 3
    report = summarise(dict(batch=4), times["ours"], [m["cpu_s_per_call"] for m in ours.windows])
    assert report["images_per_s"] == 8.0 and report["round_cpu_per_wall"] == [1.0] * 3


def test_interleave_rotates_the_order_and_ratio_stats_spread():
    from dit_jax.perf.bench import interleave, ratio_stats

    order = []

    class Stub:
        def __init__(self, name):
            self.name = name

        def window(self, calls):
            order.append(self.name)
            return 1.0

    interleave([Stub("a"), Stub("b"), Stub("c")], rounds=3, calls=1, pause_s=0.0)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    stats = ratio_stats([1.0, 2.0, 3.0, 4.0, 5.0], [1.0] * 5)
    assert (stats["median"], stats["min"], stats["max"], stats["q1"], stats["q3"]) == (3.0, 1.0, 5.0, 2.0, 4.0)
    with pytest.raises(ValueError):
        ratio_stats([1.0], [1.0, 2.0])


def test_failing_or_hanging_workers_are_killed():
    from dit_jax.perf.bench import Worker, WorkerError

    with pytest.raises(WorkerError, match="exited with status 3"):
        Worker("dies", [sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"], timeout=60)
    with pytest.raises(WorkerError, match="sent nothing within 1 s"):
        Worker("silent", [sys.executable, "-c", "import time; time.sleep(600)"], start_timeout=1)
    with Worker("fails", _fake_worker(1.0, fail_on_window=True), timeout=60) as w:
        with pytest.raises(WorkerError, match="fake failure"):
            w.window(1)
        assert w.proc.poll() is not None
    with Worker("hangs", _fake_worker(1.0, hang_on_window=True), timeout=1) as w:
        with pytest.raises(WorkerError, match="sent nothing within 1 s"):
            w.window(1)
        assert w.proc.poll() is not None  # killed, not left running
    w = Worker("left", _fake_worker(1.0), timeout=60)
    with w:
        pass  # leaving the block without close() kills it
    assert w.proc.poll() is not None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_worker_dies_with_the_process_that_started_it(tmp_path):
    """A `dit-jax bench` killed outright (no finally runs) leaves no worker computing."""
    import os
    import subprocess
    import time

    pid_file = tmp_path / "pid"
    busy = [sys.executable, "-c", "import time\nfrom dit_jax.perf.worker import die_with_parent\ndie_with_parent()\n"
            "print('@@bench {\"event\": \"ready\", \"info\": {}}', flush=True)\ntime.sleep(600)\n"]  # never reads stdin
    parent = (
        "import os, signal, sys\n"
        "from dit_jax.perf.bench import Worker\n"
        f"w = Worker('orphan', {busy!r}, timeout=60)\n"
        f"open({str(pid_file)!r}, 'w').write(str(w.proc.pid))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", parent], timeout=120)
    child = int(pid_file.read_text())
    for _ in range(100):
        try:
            os.kill(child, 0)
            with open(f"/proc/{child}/stat") as f:  # killed but not yet reaped by init counts as gone
                if f.read().split(")")[1].split()[0] == "Z":
                    return
        except (ProcessLookupError, FileNotFoundError):
            return
        time.sleep(0.1)
    os.kill(child, 9)
    pytest.fail("the worker outlived the process that started it")


@pytest.mark.parametrize("mode", ["train", "sample"])
def test_bench_cli_smoke_interleaved_side_by_side(mode, tmp_path, capsys):
    """Tiny config: ours (8 simulated devices) and both references, each in its own worker process, interleaved
    over 2 rounds; ratios per round, their median and spread; JSON lines out."""
    out = tmp_path / "bench.jsonl"
    argv = ["bench", mode, "--variant", "S/8", "--res", "64", "--batch", "8", "--steps", "2", "--warmup", "1",
            "--repeats", "2", "--torch", "--json", str(out), "--worker-timeout", "600"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "ratio dit-jax / pytorch-official (images/s)" in printed and "median of 2 rounds" in printed
    ours, official, diffusers, *ratios = [json.loads(line) for line in out.read_text().splitlines()]
    assert ours["impl"] == "dit-jax" and official["impl"] == "pytorch-official"
    assert diffusers["impl"] == "pytorch-diffusers"
    assert ours["mode"] == official["mode"] == mode and ours["devices"] == 8
    assert ours["scan_blocks"] is not None and ours["remat_policy"] is not None  # the platform's default, resolved
    for r in (ours, official, diffusers):
        assert r["variant"] == "S/8" and r["batch"] == 8 and len(r["round_step_s"]) == 2
        assert r["step_s_min"] <= r["step_s"] <= r["step_s_max"] and r["images_per_s"] > 0
    assert ours["compile_s"] > 0 and ours["tflops_per_device"] > 0 and ours["mfu"] is None  # no CPU peak
    assert ours["memory_estimate_gib"] > 0
    assert [(r["numerator"], r["denominator"]) for r in ratios] == [("dit-jax", "pytorch-official"),
                                                                    ("dit-jax", "pytorch-diffusers")]
    for r, ref in zip(ratios, (official, diffusers)):
        per = [a / b for a, b in zip(ref["round_step_s"], ours["round_step_s"])]
        assert r["per_round"] == pytest.approx(per) and r["min"] <= r["median"] <= r["max"]


def test_bench_cli_interleaves_our_settings(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    argv = ["bench", "sample", "--variant", "S/8", "--res", "64", "--batch", "4", "--steps", "1", "--warmup", "0",
            "--repeats", "1", "--settings", "scan", "unrolled:full", "--json", str(out), "--devices", "1"]
    assert cli.main(argv) == 0
    a, b, ratio = [json.loads(line) for line in out.read_text().splitlines()]
    assert (a["scan_blocks"], b["scan_blocks"], b["remat_policy"]) == (True, False, "full")
    assert (ratio["numerator"], ratio["denominator"]) == (b["name"], a["name"])
    assert "ratio dit-jax[unrolled,remat=full] / dit-jax[scan," in capsys.readouterr().out


def test_platform_defaults_fill_unset_settings():
    from dit_jax.perf.bench import BenchSpec, platform_defaults

    assert platform_defaults("gpu") == platform_defaults("tpu") == (True, "none")  # scan: compile O(1) in depth
    cpu = BenchSpec().resolved("cpu")
    assert (cpu.scan_blocks, cpu.remat_policy) == platform_defaults("cpu")
    told = BenchSpec(scan_blocks=False, remat_policy="full").resolved("cpu")
    assert (told.scan_blocks, told.remat_policy) == (False, "full")


@pytest.mark.parametrize("flags, message", [
    (["--settings", "scanned"], "--settings scanned"),
    (["--settings", "scan:lots"], "--settings scan:lots"),
    (["--settings", "scan", "scan"], "each setting once"),
    (["--torch-refs", "official,timm"], "--torch-refs official,timm"),
    (["--settings", "scan", "scan:dots_no_batch"], "the same setting on cpu"),  # the CPU default remat is that
])
def test_bench_cli_usage_errors(flags, message, capsys):
    assert cli.main(["bench", "train", "--variant", "S/8", "--res", "64", *flags]) == 2
    assert message in capsys.readouterr().err


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
