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

Side by side (`--torch`, or several of our settings): every contender runs in its own worker process (`Worker`; ours
is `serve` below, the PyTorch references are bench/torch_reference.py's `serve`), warmed up once, then `interleave`
runs rounds: each round times one window of every contender in turn, one process computing at a time, and a ratio is
computed per round (`ratio_stats`), so that drift of the machine between rounds cancels out of the ratio and its
spread over the rounds says how far it can be trusted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx

from dit_jax.diffusion import create_diffusion
from dit_jax.perf.flops import forward_macs
from dit_jax.perf.mfu import mfu, peak_flops_per_device
from dit_jax.perf.worker import PARENT_ENV, PROTOCOL_PREFIX, die_with_parent, say, serve_windows, window
from dit_jax.train.config_load import load_config
from dit_jax.train.optim import make_optimizer
from dit_jax.models.splash import mesh_context
from dit_jax.train.sharding import batch_sharding, make_mesh, param_shardings, replicated
from dit_jax.train.state import abstract_state, build_model, init_state

MODES = ("train", "sample")

# Per platform: (scan_blocks, remat_policy) of a BenchSpec that leaves them None. See BENCHMARKS.md ("Scan, unrolled
# and remat on the CPU"): on the CPU (S/2, batch 32, fp32, interleaved runs) scan with dots_no_batch tied with
# unrolled blocks without remat for the fastest step (within 1-2%), no setting was faster, and it needs the least
# memory; on GPU/TPU scan keeps compile time O(1) in depth (XL/2: ~6 s against 91 s unrolled) and no remat is the
# fastest step when the batch fits.
PLATFORM_DEFAULTS: dict[str, tuple[bool, str]] = {"cpu": (True, "dots_no_batch")}
ACCELERATOR_DEFAULT: tuple[bool, str] = (True, "none")


def platform_defaults(platform: str) -> tuple[bool, str]:
    """(scan_blocks, remat_policy) the benchmark uses on `platform` ("cpu", "gpu", "tpu") unless told."""
    return PLATFORM_DEFAULTS.get(platform, ACCELERATOR_DEFAULT)


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """One benchmark configuration. batch is global (split over `devices`); res is in pixels (latents res // 8).
    scan_blocks / remat_policy None: the platform's default (`platform_defaults`), fixed by `resolved()`."""

    variant: str = "S/2"
    batch: int = 32
    res: int = 256
    dtype: str = "float32"
    scan_blocks: bool | None = None
    remat_policy: str | None = None
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

    def resolved(self, platform: str | None = None) -> "BenchSpec":
        """This spec with scan_blocks and remat_policy set (the defaults of `platform`, default: jax's backend)."""
        if self.scan_blocks is not None and self.remat_policy is not None:
            return self
        scan, remat = platform_defaults(platform or jax.default_backend())
        return dataclasses.replace(self, scan_blocks=scan if self.scan_blocks is None else self.scan_blocks,
                                   remat_policy=remat if self.remat_policy is None else self.remat_policy)

    def config(self) -> Any:
        """The configs/dit_imagenet.py config this spec benchmarks (ml_collections, validated)."""
        spec = self.resolved()
        overrides = [f"model.dtype={spec.dtype}", f"model.scan_blocks={spec.scan_blocks}",
                     f"model.remat_policy={spec.remat_policy}", f"model.attn_impl={spec.attn_impl}"]
        return load_config(f"configs/dit_imagenet.py:variant={spec.variant},res={spec.res}", overrides)


def _devices(n: int) -> list:
    devices = jax.devices()
    if n < 0 or n > len(devices):
        raise ValueError(f"devices={n}: this process sees {len(devices)} devices")
    return devices[:n] if n else devices


def forward_flops(model_cfg: Any) -> float:
    """Real FLOPs (2 x MACs) of one forward pass of one example."""
    return 2.0 * forward_macs(model_cfg)


def _jax_window(run: Callable[[], Any], calls: int) -> dict[str, float]:
    """dit_jax.perf.worker.window for a jitted call: no host transfer inside the window, synchronised at its end."""
    return window(run, calls, guard=lambda: jax.transfer_guard("disallow"), sync=jax.block_until_ready)


def _time_windows(run: Callable[[], Any], spec: BenchSpec) -> list[float]:
    """Seconds per call: warm-up, then `windows` timed windows of steps // windows calls each."""
    for _ in range(spec.warmup):
        out = run()
    if spec.warmup:
        jax.block_until_ready(out)
    return [_jax_window(run, spec.steps // spec.windows)["seconds_per_call"] for _ in range(spec.windows)]


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


@dataclasses.dataclass
class Prepared:
    """A compiled workload: run() is one call (asynchronous), check(out) raises on a non-finite result."""

    spec: BenchSpec
    mode: str
    run: Callable[[], Any]
    check: Callable[[Any], None]
    flops_per_call: float
    images_per_call: int
    devices: list
    compile_info: dict[str, float]
    memory: dict

    def report(self, times: list[float]) -> dict[str, Any]:
        return _report(self.spec, self.mode, times, self.flops_per_call, self.images_per_call, self.devices,
                       self.compile_info, self.memory)


def prepare_train(spec: BenchSpec) -> Prepared:
    """The trainer's step, compiled, on a fixed batch (see the module docstring)."""
    from dit_jax.train.step import make_train_step

    spec = spec.resolved()

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

    def check(out: Any) -> None:
        loss = float(jax.device_get(out))
        if not np.isfinite(loss):
            raise FloatingPointError(f"benchmark train step produced a non-finite loss {loss}")

    flops_per_step = 3.0 * forward_flops(cfg.model) * spec.batch
    return Prepared(spec, "train", run, check, flops_per_step, spec.batch, devices, compile_info,
                    _peak_memory(compiled, devices))


def prepare_sample(spec: BenchSpec) -> Prepared:
    """One guided denoiser evaluation for `batch` images (2 x batch model inputs), compiled."""
    spec = spec.resolved()
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
    def check(out: Any) -> None:
        if not np.all(np.isfinite(jax.device_get(out))):
            raise FloatingPointError("benchmark sampling forward produced non-finite values")

    flops_per_call = forward_flops(cfg.model) * 2 * spec.batch
    return Prepared(spec, "sample", lambda: compiled(state, inputs), check, flops_per_call, spec.batch, devices,
                    compile_info, _peak_memory(compiled, devices))


def prepare(mode: str, spec: BenchSpec) -> Prepared:
    """The compiled workload of `mode` ("train" or "sample")."""
    if mode not in MODES:
        raise ValueError(f"unknown bench mode {mode!r}; expected one of {MODES}")
    return prepare_train(spec) if mode == "train" else prepare_sample(spec)


def bench_train(spec: BenchSpec) -> dict[str, Any]:
    """Steady-state throughput of the trainer's step (see the module docstring)."""
    return _measure(prepare_train(spec))


def bench_sample(spec: BenchSpec) -> dict[str, Any]:
    """Steady-state throughput of one guided denoiser evaluation for `batch` images (2 x batch model inputs)."""
    return _measure(prepare_sample(spec))


def _measure(p: Prepared) -> dict[str, Any]:
    times = _time_windows(p.run, p.spec)
    p.check(p.run())
    return p.report(times)


def run_bench(mode: str, spec: BenchSpec) -> dict[str, Any]:
    """Compile, warm up, time spec.windows windows in this process; the report (module docstring)."""
    if mode not in MODES:
        raise ValueError(f"unknown bench mode {mode!r}; expected one of {MODES}")
    return bench_train(spec) if mode == "train" else bench_sample(spec)


# ==============================================================================================================
# Interleaved runs: one worker process per contender, rounds of one window each
# ==============================================================================================================
def serve(mode: str, spec: BenchSpec, commands: Any = None) -> None:
    """Our side of the worker protocol (dit_jax/perf/worker.py): compile and warm up, say `ready`
    with the setup (compile times, memory, FLOPs per call), then time `window N` requests (seconds per call)
    read from `commands` (default stdin) until `quit`; finally check the last output is finite and say `done`."""
    p = prepare(mode, spec)
    t0 = time.perf_counter()
    out = None
    for _ in range(p.spec.warmup):
        out = p.run()
    if out is not None:
        jax.block_until_ready(out)
    info = p.report([1.0])  # the static part of a report; the times are the caller's
    info = {k: v for k, v in info.items() if not k.startswith(("step_s", "steps_per", "images_per", "tflops", "mfu"))}
    say("ready", info=dict(info, flops_per_call=p.flops_per_call, images_per_call=p.images_per_call,
                           peak_flops_per_device=peak_flops_per_device(p.devices[0]),
                           warmup_s=time.perf_counter() - t0))
    serve_windows(p.run, commands, window_fn=_jax_window)
    p.check(p.run())
    say("done", info={})


def serve_main(argv: Sequence[str] | None = None) -> None:
    """`python -c 'from dit_jax.perf.bench import serve_main; serve_main()' MODE SPEC_JSON`: our worker."""
    die_with_parent()
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        raise SystemExit("usage: serve_main MODE SPEC_JSON")
    serve(argv[0], BenchSpec(**json.loads(argv[1])))


def our_worker_argv(mode: str, spec: BenchSpec) -> list[str]:
    """The command line of a worker process timing our `mode` with `spec` (this Python, this environment)."""
    return [sys.executable, "-c", "from dit_jax.perf.bench import serve_main; serve_main()", mode,
            json.dumps(dataclasses.asdict(spec))]


class WorkerError(RuntimeError):
    """A worker process failed, broke the protocol or ran past its time limit (it is killed first)."""


class Worker:
    """A benchmark worker process (argv), spoken to over its stdin/stdout (bench/torch_reference.py's docstring).

    Starting waits for its `ready` line (up to `start_timeout` s); window(calls) asks for one timed window and
    returns seconds per call (up to `timeout` s). Any failure, a timeout or a protocol error kills the process and
    raises WorkerError with the tail of its stderr. close() asks it to quit and kills it if it does not within
    `timeout`; use it as a context manager."""

    def __init__(self, name: str, argv: Sequence[str], *, start_timeout: float = 1800.0, timeout: float = 1800.0,
                 env: dict[str, str] | None = None):
        self.name, self.argv, self.timeout = name, list(argv), timeout
        self._err = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
        self._lines: queue.Queue = queue.Queue()
        self.windows: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                     text=True, bufsize=1, env={**(os.environ if env is None else env),
                                                                PARENT_ENV: str(os.getpid())})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.info: dict[str, Any] = self._expect("ready", start_timeout)["info"]
        except BaseException:
            self.kill()
            raise

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL_PREFIX):
                self._lines.put(line[len(PROTOCOL_PREFIX):])
        self._lines.put(None)  # end of output: the process is exiting

    def stderr_tail(self, lines: int = 15) -> str:
        self._err.seek(0)
        return "\n".join(self._err.read().strip().splitlines()[-lines:])

    def _fail(self, why: str) -> WorkerError:
        self.kill()
        return WorkerError(f"benchmark worker {self.name!r} {why}; its stderr ends:\n{self.stderr_tail()}")

    def _expect(self, event: str, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise self._fail(f"sent nothing within {timeout:g} s (waiting for {event!r})") from None
        if line is None:
            self.proc.wait()
            raise self._fail(f"exited with status {self.proc.returncode} before {event!r}")
        msg = json.loads(line)
        if msg.get("event") != event:
            raise self._fail(f"said {msg.get('event')!r} where {event!r} was expected")
        return msg

    def _send(self, text: str) -> None:
        try:
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.proc.wait()
            raise self._fail(f"exited with status {self.proc.returncode}") from None

    def window(self, calls: int) -> float:
        """Seconds per call over `calls` consecutive calls, timed inside the worker (the whole message, with the
        worker's CPU seconds per call where it reports them, is appended to self.windows)."""
        self._send(f"window {calls}")
        msg = self._expect("window", self.timeout)
        self.windows.append(msg)
        return float(msg["seconds_per_call"])

    def close(self) -> dict[str, Any]:
        """Ask the worker to finish (it checks its last output is finite) and wait; its `done` info."""
        if self.proc.poll() is not None:
            return {}
        self._send("quit")
        done = self._expect("done", self.timeout)
        try:
            self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise self._fail("did not exit after 'quit'") from None
        if self.proc.returncode:
            raise self._fail(f"exited with status {self.proc.returncode}")
        return done.get("info", {})

    def kill(self) -> None:
        """End the process now (no-op when it has exited) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.kill()
        for f in (self.proc.stdin, self._err):
            try:
                f.close()
            except OSError:
                pass


def interleave(workers: Sequence[Worker], rounds: int, calls: int, pause_s: float = 0.5) -> dict[str, list[float]]:
    """`rounds` rounds; in each, one window of `calls` calls from every worker in turn (the order rotates by one
    worker per round, so none always runs first). Returns seconds per call, one entry per round, by worker name.
    pause_s: a rest between windows, so that the previous process's threads have gone idle."""
    if rounds < 1 or calls < 1:
        raise ValueError(f"rounds={rounds} and calls={calls} must be >= 1")
    names = [w.name for w in workers]
    if len(set(names)) != len(names):
        raise ValueError(f"worker names must differ: {names}")
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(workers)):
            w = workers[(r + i) % len(workers)]
            times[w.name].append(w.window(calls))
            time.sleep(pause_s)
    return times


def ratio_stats(numer: Sequence[float], denom: Sequence[float]) -> dict[str, Any]:
    """Per-round ratios numer[i] / denom[i] and their median, min, max and quartiles (statistics' 'inclusive')."""
    if len(numer) != len(denom) or not numer:
        raise ValueError("ratio_stats needs two equally long, non-empty lists")
    per = [a / b for a, b in zip(numer, denom)]
    q1, _, q3 = statistics.quantiles(per, n=4, method="inclusive") if len(per) > 1 else (per[0],) * 3
    return dict(per_round=per, median=statistics.median(per), min=min(per), max=max(per), q1=q1, q3=q3,
                rounds=len(per))


def summarise(info: dict[str, Any], times: list[float], cpu_s: Sequence[float | None] = ()) -> dict[str, Any]:
    """A worker's report: its setup info plus the median, min and max of its per-round seconds per call, the rates
    they give (images/s; TFLOP/s per device where info has flops_per_call), the per-round times and, where given,
    the per-round process CPU seconds per wall second (round_cpu_per_wall: ~ the cores it kept busy)."""
    step_s = statistics.median(times)
    out = dict(info, step_s=step_s, step_s_min=min(times), step_s_max=max(times), steps_per_s=1.0 / step_s,
               images_per_s=info["batch"] / step_s, round_step_s=list(times))
    if cpu_s and all(c is not None for c in cpu_s):
        out["round_cpu_per_wall"] = [c / t for c, t in zip(cpu_s, times)]
    if "flops_per_call" in info:
        out["tflops_per_device"] = info["flops_per_call"] / step_s / info["devices"] / 1e12
        out["mfu"] = mfu(info["flops_per_call"], step_s, info["devices"], info.get("peak_flops_per_device"))
    return out


def worker_env() -> dict[str, str]:
    """This process's environment, for a worker (unbuffered output; the rest as is)."""
    return dict(os.environ, PYTHONUNBUFFERED="1")

