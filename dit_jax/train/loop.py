"""The trainer: reads top to bottom in phases (as big_vision's train.py).

mesh -> input -> model and optimizer (abstract) -> shard and transfer (restore or init) -> update step (AOT
compiled) -> checkpointing -> train loop (metrics, NaN guard, checkpoints, preemption, EMA samples and their
quality: dit_jax/train/samples.py).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from dit_jax import distributed
from dit_jax.data import make_train_iterator
from dit_jax.data.prefetch import DevicePrefetch
from dit_jax.diffusion import create_diffusion
from dit_jax.models.splash import mesh_context
from dit_jax.perf.flops import forward_macs
from dit_jax.perf.mfu import mfu, peak_flops_per_device
from dit_jax.train import metrics as metrics_lib
from dit_jax.train.chart import plot_loss
from dit_jax.train.checkpoint import Checkpointer
from dit_jax.train.config_load import config_to_dict
from dit_jax.train.config_schema import ConfigError, data_space
from dit_jax.train.optim import make_optimizer
from dit_jax.train.run_lock import RunLock, RunLockedError
from dit_jax.train.samples import QualityEval, write_grid
from dit_jax.train.sharding import (
    batch_sharding,
    local_rows,
    make_mesh,
    param_shardings,
    replicated,
    shard_batch,
)
from dit_jax.train.state import abstract_state, init_state, target_encoder
from dit_jax.train.flow_step import make_flow_train_step
from dit_jax.train.step import make_train_step

log = logging.getLogger("dit_jax.train")
FAULT_ENV = "DIT_JAX_FAULT_AFTER_STEP"  # test hook: SIGKILL this process once the checkpoint of that step is on disk


def diffusion_kwargs(diffusion_cfg: Any) -> dict[str, Any]:
    keys = ("timestep_respacing", "noise_schedule", "use_kl", "sigma_small", "predict_xstart", "learn_sigma",
            "rescale_learned_sigmas", "diffusion_steps")
    return {k: diffusion_cfg[k] for k in keys}


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def train_flops_per_example(config: Any) -> float:
    """Real FLOPs of one training example: 3 x forward (forward + backward), 2 FLOPs per MAC."""
    return 3 * 2 * forward_macs(config.model)


def off_clock(fn: Any, *args: Any) -> float:
    """fn(*args); the seconds it took (added to the rate window's start, so rates count training only)."""
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def train(config: Any, workdir: str | os.PathLike) -> dict[str, Any]:
    """Train (or resume) in `workdir`. Returns a summary dict (final step, last metrics, paths)."""
    distributed.initialize()  # no-op if the CLI started the job (or one process); env JAX_* otherwise
    tag = distributed.process_tag()  # "[p1/4] " on every line a process prints about itself
    workdir = epath.Path(workdir)  # a local folder, or gs://... (Orbax writes there; logs are staged, metrics.py)
    # one trainer per run: process 0 holds the workdir's lock for the whole run (dit_jax/train/run_lock.py);
    # everything below writes into the run only while it is held
    lock = RunLock(workdir)
    ok, _ = distributed.on_process_0("dit_jax/train/run-lock", lock.acquire)  # process 0 re-raises its error
    if not ok:
        raise RunLockedError(f"process 0 could not lock {workdir} (its error says why)")
    try:
        return _train_locked(config, workdir, lock, tag)
    finally:
        lock.release()


def _train_locked(config: Any, workdir: epath.Path, lock: RunLock, tag: str) -> dict[str, Any]:
    is_main = jax.process_index() == 0

    # ================================================================ mesh
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
    global_batch = config.train.global_batch
    if global_batch % mesh.size:
        raise ValueError(f"train.global_batch={global_batch} is not divisible by the {mesh.size} devices")
    log.info("%smesh %s over %d devices (%d processes)", tag, dict(mesh.shape), mesh.size, jax.process_count())

    # ================================================================ input
    flow_objective = config.objective == "flow"
    repa_on = flow_objective and config.repa.weight > 0
    latent_scale = config.data.latent_scale if data_space(config) == "latent" else None
    # REPA's target encoder reads the clean images: latent shards must carry them (extract-latents --store-images)
    try:
        # this process reads the rows of every global batch that its devices hold: the data order depends on
        # (data, seed, global batch) only, so 1 x 8 devices, 2 x 4 and a resume on another topology agree
        data_iter = make_train_iterator(config.data, global_batch=global_batch, seed=config.seed,
                                        rows=local_rows(mesh, global_batch),
                                        with_images=repa_on and latent_scale is not None)
    except (ValueError, FileNotFoundError) as e:  # missing, mismatched or unsuitable data: say so plainly
        raise ConfigError(f"cannot open the training data ({config.data.source}): {e}") from e

    # the quality evaluation's network, statistics and VAE load now: a missing file stops the run before it starts
    quality = QualityEval(config)

    # ================================================================ model and optimizer (abstract)
    optimizer = make_optimizer(config.optim)
    diffusion = None if flow_objective else create_diffusion(**diffusion_kwargs(config.diffusion))
    graphdef, abstract = abstract_state(config.model, optimizer, config.seed, config.repa)
    shardings = param_shardings(abstract, mesh, fsdp=bool(config.fsdp))
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract["params"]))

    # ================================================================ shard and transfer (restore or init)
    ckpt = Checkpointer(workdir / "checkpoints", keep=config.train.keep_ckpts)
    if ckpt.latest_step() is not None:
        restored = ckpt.restore(_with_shardings(abstract, shardings))
        state = restored.state
        if restored.data_state:
            data_iter.set_state(restored.data_state)
        print(f"{tag}resumed from step {restored.step} in {ckpt.directory}", flush=True)
    else:
        if repa_on and config.repa.encoder == "dinov2_vitb14" and not config.repa.encoder_path:
            raise ConfigError(
                "repa.encoder=dinov2_vitb14 needs repa.encoder_path, a local dinov2_vitb14_pretrain.pth (nothing is "
                "downloaded); repa.encoder=random for a smoke run, or repa.weight=0 to turn REPA off")
        state = jax.jit(lambda: init_state(config.model, optimizer, config.seed, config.repa)[1],
                        out_shardings=shardings)()
        if repa_on and config.repa.encoder_path:  # the released target encoder, loaded outside jit
            from dit_jax.convert.dinov2 import load_dinov2_file

            encoder = load_dinov2_file(config.repa.encoder_path)
            state["frozen"] = jax.device_put(nnx.split(encoder)[1].to_pure_dict(), shardings["frozen"])
    start_step = int(jax.device_get(state["step"]))

    # ================================================================ update step (AOT compiled)
    if flow_objective:
        encoder_graphdef = nnx.split(nnx.eval_shape(lambda: target_encoder(config.repa)))[0] if repa_on else None
        train_step = make_flow_train_step(
            graphdef, optimizer, t_dist=config.flow.t_dist, latent_scale=latent_scale,
            repa_weight=float(config.repa.weight) if repa_on else 0.0, repa_layer=int(config.repa.layer),
            encoder_graphdef=encoder_graphdef, time_scale=float(config.flow.time_scale))
    else:
        train_step = make_train_step(graphdef, diffusion, optimizer, latent_scale=latent_scale)
    b_shard = batch_sharding(mesh)
    probe = next(data_iter)  # shapes of a batch; it is also the first batch trained on
    abstract_batch = {
        k: jax.ShapeDtypeStruct((global_batch, *np.shape(v)[1:]), np.asarray(v).dtype, sharding=b_shard)
        for k, v in probe.items()
    }
    jitted = jax.jit(
        train_step,
        in_shardings=(shardings, {k: b_shard for k in abstract_batch}),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=(0,),
    )
    t0 = time.perf_counter()
    with mesh_context(mesh, config.model.attn_impl):  # splash attention's shard_map reads the ambient mesh
        compiled = jitted.lower(_with_shardings(abstract, shardings), abstract_batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    mem_gb = None if mem is None else (mem.temp_size_in_bytes + mem.argument_size_in_bytes) / 2**30
    print(f"{tag}model {n_params / 1e6:.2f}M params; train step compiled in {compile_s:.1f}s"
          + (f", {mem_gb:.2f} GiB per device (args + temps)" if mem_gb is not None else ""), flush=True)

    # ================================================================ checkpointing
    # logs are opened only now: a run that cannot start (bad data, no restorable checkpoint) leaves no trace
    writer = metrics_lib.MetricWriter(str(workdir), enabled=is_main)
    cfg_dict = config_to_dict(config)
    ckpt.install_sigterm_handler()
    fault_step = int(os.environ.get(FAULT_ENV, "-1"))

    def save(step: int, force: bool = False) -> None:
        if not distributed.all_agree("dit_jax/train/lock-held", not lock.lost):
            ckpt.close()
            raise RunLockedError(f"another trainer took over {workdir} (this one was presumed dead): stopped "
                                 f"without saving step {step}")
        ckpt.save(step, state, data_state=feed.get_state(), config=cfg_dict, force=force)

    # ================================================================ train loop
    # The probe batch is the first batch of this run: use it rather than dropping it. Later batches come from
    # the device prefetcher, whose get_state() is the position after the last batch handed to the step.
    feed = DevicePrefetch(data_iter, lambda local: shard_batch(local, mesh), depth=int(config.data.prefetch))
    pending = shard_batch(probe, mesh)
    peak = peak_flops_per_device(jax.devices()[0])
    flops_per_step = train_flops_per_example(config) * global_batch
    total = config.train.steps
    progress = metrics_lib.Progress(total, initial=start_step) if is_main else None
    # a line per log step wherever no bar is shown: batch jobs' logs, and every process but the first
    log_lines = progress is None or not progress.shown
    window: list[dict] = []
    t_window = time.perf_counter()
    last: dict[str, float] = {}
    step = start_step
    status = "done"

    def evaluate(step: int) -> None:
        scores = quality(graphdef, state, step)
        if scores:  # process 0
            writer.write_scalars(step, scores)
            line = (f"step {step} sample quality ({quality.num_samples} EMA samples): "
                    f"{metrics_lib.format_metrics(scores)}")
            if progress and progress.shown:
                progress.write(line)
            else:
                print(f"{tag}{line}", flush=True)

    # a resumed run whose last evaluation was lost (stopped between the save of a due step and its evaluation)
    if step and quality.due(step) and not distributed.all_agree(
            "dit_jax/train/quality-logged", not is_main or quality.logged(writer.jsonl_path, step)):
        evaluate(step)
    while step < total:
        batch = pending if pending is not None else next(feed)
        pending = None
        with jax.transfer_guard("disallow"):
            state, m = compiled(state, batch)
        window.append(m)
        step += 1

        if step % config.train.log_every == 0 or step == total:
            host = jax.device_get(window)
            last = {k: float(np.mean([w[k] for w in host])) for k in host[0]}
            if config.train.nan_check and not all(np.isfinite(v) for v in last.values()):
                writer.flush()
                verified = ckpt.newest_verified_step()  # waits for the pending save; nothing newer is saved
                ckpt.close()
                where = (f"the newest checkpoint that verifies is step {verified} in {ckpt.directory} (a rerun "
                         f"resumes from the newest step that verifies)" if verified is not None
                         else f"no checkpoint in {ckpt.directory} verifies")
                raise FloatingPointError(
                    f"non-finite metrics at step {step}: {metrics_lib.format_metrics(last)}. Stopped without "
                    f"saving; {where}. Lower optim.lr or raise optim.warmup_steps / set optim.grad_clip_norm"
                )
            dt = time.perf_counter() - t_window
            steps_per_s = len(window) / dt
            last.update(
                steps_per_s=steps_per_s,
                images_per_s=steps_per_s * global_batch,
                tflops_per_device=steps_per_s * flops_per_step / mesh.size / 1e12,
                bad_records=float(feed.stats().get("bad_records", 0)),
            )
            util = mfu(flops_per_step, 1.0 / steps_per_s, mesh.size, peak)
            if util is not None:
                last["mfu"] = util
            writer.write_scalars(step, last)
            window, t_window = [], time.perf_counter()
            if progress:
                progress.update(step, last)
            if log_lines:
                print(f"{tag}step {step}/{total} {metrics_lib.format_metrics(last)}", flush=True)

        if config.train.sample_every and step % config.train.sample_every == 0 and step != total:
            t_window += off_clock(write_grid, writer, graphdef, state, config, step)  # rates count training only

        # SIGTERM reaches hosts at different steps: reached_preemption agrees on one step across processes
        preempted = ckpt.reached_preemption(step)
        every = config.train.ckpt_every  # 0: only at the end (and on preemption)
        if (every and step % every == 0) or step == total or preempted:
            save(step, force=True)
            if step == fault_step:
                ckpt.wait()
                os.kill(os.getpid(), signal.SIGKILL)
            if preempted:
                ckpt.wait()
                status = "preempted"
                print(f"{tag}SIGTERM: saved step {step} and stopping", flush=True)
                break

        if quality.due(step):  # after the save: a failing evaluation cannot cost the checkpoint
            t_window += off_clock(evaluate, step)

    # ================================================================ wrap up
    ckpt.wait()
    ckpt.close()
    if progress:
        progress.close()
    loss_png = writer.local_dir / "loss.png"
    if is_main and writer.jsonl_path.exists():
        plot_loss(writer.jsonl_path, loss_png, side_keys=quality.keys if quality.every else ())
    writer.close()  # copies a remote workdir's staged logs, loss.png included
    return dict(step=step, status=status, metrics=last, workdir=str(workdir), graphdef=graphdef, state=state,
                compile_s=compile_s, loss_png=str(loss_png))
