"""Throughput of the trainer's step and of the guided sampling forward, measured the way MaxDiffusion logs them.

    dit-jax bench train  --variant S/2 --batch 32 --dtype float32 --torch   # + the PyTorch reference, the ratio
    dit-jax bench sample --variant S/2 --batch 32 --dtype float32 --torch

train: the trainer's own jitted step (dit_jax.train.step.make_train_step on the configs/dit_imagenet.py model and
optimizer: hybrid loss, AdamW, EMA; state donated; batches of VAE moments as the trainer reads them), sharded over
the mesh exactly as train/loop.py shards it. sample: one classifier-free-guided denoiser evaluation for `batch`
images (the model on 2 x batch inputs, model.forward_with_cfg), the unit of cost of every sampler step.

Compile time (trace + lower, XLA compile) is measured AOT and reported apart; steady state is the median of timed
windows after warm-up, with the transfer guard on (no host synchronisation inside a window) and data already on
the devices (input-pipeline cost is not part of these numbers). FLOPs are the model's (2 x MACs,
dit_jax.perf.flops; 3 x forward for a train step), so TFLOP/s and MFU (dit_jax.perf.mfu) are comparable across
implementations and hardware. The command is dit_jax.perf.cli.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from dit_jax.diffusion import create_diffusion
from dit_jax.perf.flops import forward_macs
from dit_jax.perf.mfu import mfu, peak_flops_per_device
from dit_jax.train.config_load import load_config
from dit_jax.train.optim import make_optimizer
from dit_jax.models.splash import mesh_context
from dit_jax.train.sharding import batch_sharding, make_mesh, param_shardings, replicated
from dit_jax.train.state import abstract_state, build_model, init_state

MODES = ("train", "sample")


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """One benchmark configuration. batch is global (split over `devices`); res is in pixels (latents res // 8)."""

    variant: str = "S/2"
    batch: int = 32
    res: int = 256
    dtype: str = "float32"
    scan_blocks: bool = True
    remat_policy: str = "none"
    attn_impl: str = "xla"
    steps: int = 20
    warmup: int = 3
    windows: int = 5
    devices: int = 0  # 0: all
    cfg_scale: float = 4.0

    def __post_init__(self) -> None:
        bad = [f"{k}={getattr(self, k)} must be >= {low}"
               for k, low in (("batch", 1), ("steps", 1), ("warmup", 0), ("windows", 1), ("devices", 0))
               if getattr(self, k) < low]
        if bad:
            raise ValueError("; ".join(bad))
        if self.steps < self.windows:
            raise ValueError(f"steps={self.steps} must be at least windows={self.windows}")
        if not self.cfg_scale >= 0:
            raise ValueError(f"cfg_scale={self.cfg_scale} must be a number >= 0")

    def config(self) -> Any:
        """The configs/dit_imagenet.py config this spec benchmarks (ml_collections, validated)."""
        overrides = [f"model.dtype={self.dtype}", f"model.scan_blocks={self.scan_blocks}",
                     f"model.remat_policy={self.remat_policy}", f"model.attn_impl={self.attn_impl}"]
        return load_config(f"configs/dit_imagenet.py:variant={self.variant},res={self.res}", overrides)


def _devices(n: int) -> list:
    devices = jax.devices()
    if n < 0 or n > len(devices):
        raise ValueError(f"devices={n}: this process sees {len(devices)} devices")
    return devices[:n] if n else devices


def forward_flops(model_cfg: Any) -> float:
    """Real FLOPs (2 x MACs) of one forward pass of one example."""
    return 2.0 * forward_macs(model_cfg)


def _time_windows(run: Callable[[], Any], spec: BenchSpec) -> list[float]:
    """Seconds per call: warm-up, then `windows` timed windows of steps // windows calls each."""
    for _ in range(spec.warmup):
        out = run()
    if spec.warmup:
        jax.block_until_ready(out)
    per = spec.steps // spec.windows
    times = []
    for _ in range(spec.windows):
        t0 = time.perf_counter()
        with jax.transfer_guard("disallow"):
            for _ in range(per):
                out = run()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / per)
    return times


def _peak_memory(compiled: Any, devices: list) -> dict[str, float | None]:
    """Compiled estimate (arguments + temporaries + outputs not aliased to arguments) and, where the runtime
    reports it (GPU, TPU), the allocator's peak bytes in use. GiB per device."""
    est = None
    mem = compiled.memory_analysis()
    if mem is not None:
        est = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
               - mem.alias_size_in_bytes) / 2**30
    peak = None
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        peak = max(d.memory_stats()["peak_bytes_in_use"] for d in devices) / 2**30
    return dict(memory_estimate_gib=est, peak_memory_gib=peak)


def _report(spec: BenchSpec, mode: str, times: list[float], flops_per_call: float, images_per_call: int,
            devices: list, compile_info: dict[str, float], memory: dict) -> dict[str, Any]:
    step_s = statistics.median(times)
    n = len(devices)
    peak = peak_flops_per_device(devices[0])
    tflops = flops_per_call / step_s / n / 1e12
    return dict(
        dataclasses.asdict(spec),  # the configuration, then the measurements (devices: the count used)
        impl="dit-jax",
        mode=mode,
        platform=devices[0].platform,
        device_kind=devices[0].device_kind,
        devices=n,
        step_s=step_s,
        step_s_min=min(times),
        step_s_max=max(times),
        steps_per_s=1.0 / step_s,
        images_per_s=images_per_call / step_s,
        tflops_per_device=tflops,
        mfu=mfu(flops_per_call, step_s, n, peak),
        **compile_info,
        **memory,
    )


def _compile(jitted: Any, *args: Any) -> tuple[Any, dict[str, float]]:
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, dict(trace_lower_s=t1 - t0, compile_s=t2 - t1)


def random_moments(spec: BenchSpec, model_cfg: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch as the latent pipeline yields it: VAE moments [mean | logvar] (B, h, w, 2C) and labels (B,)."""
    rng = np.random.default_rng(seed)
    side = model_cfg.input_size
    c = model_cfg.in_channels
    mean = rng.standard_normal((spec.batch, side, side, c), dtype=np.float32) * 5.0
    logvar = np.full((spec.batch, side, side, c), -6.0, np.float32)
    y = rng.integers(0, model_cfg.num_classes, spec.batch).astype(np.int32)
    return dict(x=np.concatenate([mean, logvar], axis=-1), y=y)


def bench_train(spec: BenchSpec) -> dict[str, Any]:
    """Steady-state throughput of the trainer's step (see the module docstring)."""
    from dit_jax.train.step import make_train_step

    cfg = spec.config()
    devices = _devices(spec.devices)
    mesh = make_mesh(-1, 1, devices)
    if spec.batch % mesh.size:
        raise ValueError(f"batch={spec.batch} is not divisible by the {mesh.size} devices")
    optimizer = make_optimizer(cfg.optim)
    graphdef, abstract = abstract_state(cfg.model, optimizer, cfg.seed)
    shardings = param_shardings(abstract, mesh, fsdp=False)
    state = jax.jit(lambda: init_state(cfg.model, optimizer, cfg.seed)[1], out_shardings=shardings)()
    b_shard = batch_sharding(mesh)
    batch = jax.device_put(random_moments(spec, cfg.model), b_shard)
    step = make_train_step(graphdef, create_diffusion(""), optimizer, latent_scale=cfg.data.latent_scale)
    jitted = jax.jit(step, in_shardings=(shardings, {k: b_shard for k in batch}),
                     out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))
    with mesh_context(mesh, cfg.model.attn_impl):
        compiled, compile_info = _compile(jitted, state, batch)
    holder = {"state": state}

    def run() -> Any:
        holder["state"], m = compiled(holder["state"], batch)
        return m["loss"]

    times = _time_windows(run, spec)
    loss = float(jax.device_get(run()))
    if not np.isfinite(loss):
        raise FloatingPointError(f"benchmark train step produced a non-finite loss {loss}")
    flops_per_step = 3.0 * forward_flops(cfg.model) * spec.batch
    return _report(spec, "train", times, flops_per_step, spec.batch, devices, compile_info,
                   _peak_memory(compiled, devices))


def bench_sample(spec: BenchSpec) -> dict[str, Any]:
    """Steady-state throughput of one guided denoiser evaluation for `batch` images (2 x batch model inputs)."""
    cfg = spec.config()
    devices = _devices(spec.devices)
    mesh = make_mesh(-1, 1, devices)
    if (2 * spec.batch) % mesh.size:
        raise ValueError(f"2 x batch={2 * spec.batch} is not divisible by the {mesh.size} devices")
    model = build_model(cfg.model, cfg.seed)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, replicated(mesh))
    rng = np.random.default_rng(0)
    side, c = cfg.model.input_size, cfg.model.in_channels
    x = rng.standard_normal((spec.batch, side, side, c), dtype=np.float32)
    y = rng.integers(0, cfg.model.num_classes, spec.batch).astype(np.int32)
    t = rng.integers(0, 1000, spec.batch).astype(np.int32)
    b_shard = batch_sharding(mesh)
    inputs = jax.device_put(
        dict(x=np.concatenate([x, x]), t=np.concatenate([t, t]),
             y=np.concatenate([y, np.full_like(y, cfg.model.num_classes)])), b_shard)

    def forward(state: Any, inputs: dict) -> jax.Array:
        m = nnx.merge(graphdef, state)
        return m.forward_with_cfg(inputs["x"], inputs["t"], inputs["y"], spec.cfg_scale)

    jitted = jax.jit(forward, out_shardings=b_shard)
    with mesh_context(mesh, cfg.model.attn_impl):
        compiled, compile_info = _compile(jitted, state, inputs)
    times = _time_windows(lambda: compiled(state, inputs), spec)
    out = jax.device_get(compiled(state, inputs))
    if not np.all(np.isfinite(out)):
        raise FloatingPointError("benchmark sampling forward produced non-finite values")
    flops_per_call = forward_flops(cfg.model) * 2 * spec.batch
    return _report(spec, "sample", times, flops_per_call, spec.batch, devices, compile_info,
                   _peak_memory(compiled, devices))


def run_bench(mode: str, spec: BenchSpec) -> dict[str, Any]:
    if mode not in MODES:
        raise ValueError(f"unknown bench mode {mode!r}; expected one of {MODES}")
    return bench_train(spec) if mode == "train" else bench_sample(spec)

