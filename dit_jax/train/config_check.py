"""Checking a trainer config (dit_jax.train.config_io) before anything runs: impossible values, and settings the
command line changed that the chosen model, objective or data source would silently ignore.

`validate_config(config, changed=keys)` raises one ConfigError that lists every problem, each naming the key and
what to type instead; `load_config` calls it with the keys its overrides changed. `check_run` adds what only
a starting run knows (the device count) and what the trainer cannot do yet.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Sequence

from ml_collections import ConfigDict

from dit_jax.constants import VAE_CHANNELS, VAE_DOWNSAMPLE
from dit_jax.train.config_io import (
    DATA_SOURCES,
    MODEL_DTYPES,
    NOISE_SCHEDULES,
    ConfigError,
    flat_keys,
)

__all__ = ["check_run", "inapplicable", "validate_config"]

OBJECTIVES = ("diffusion", "flow")
ARCHS = ("dit", "ddt")
FLOW_T_DISTS = ("logit_normal", "uniform")
REPA_ENCODERS = ("dinov2_vitb14", "random")


def _raise(errors: list[str]) -> None:
    if errors:
        raise ConfigError("invalid config:\n  " + ";\n  ".join(errors))


def _leaf(config: ConfigDict, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


# ==========================================================================================================
# Settings that do not apply
# ==========================================================================================================
def _applicability(config: ConfigDict) -> list[tuple[Callable[[str], bool], bool, str]]:
    """(matches key, applies, why not) for the keys whose use depends on other settings."""
    m, data = config.model, config.data
    objective, arch, source = config.objective, m.arch, data.source
    repa_on = config.repa.weight > 0

    def prefix(p: str) -> Callable[[str], bool]:
        return lambda key: key.startswith(p)

    def one_of(*keys: str) -> Callable[[str], bool]:
        return lambda key: key in keys

    def diffusion_key(key: str) -> bool:
        # diffusion.learn_sigma mirrors model.learn_sigma: setting the two together stays harmless
        return key.startswith("diffusion.") and not (key == "diffusion.learn_sigma"
                                                     and config.diffusion.learn_sigma == m.learn_sigma)

    return [
        (prefix("flow."), objective == "flow",
         f"flow matching settings apply to objective=flow only, and this config trains objective={objective!r} "
         f"(add --config.objective=flow, or drop the flag)"),
        (diffusion_key, objective == "diffusion",
         "Gaussian diffusion settings apply to objective=diffusion only, and this config trains objective='flow' "
         "(its settings are flow.*)"),
        (lambda key: key.startswith("repa.") and key != "repa.weight", repa_on,
         "REPA settings apply only with REPA on (repa.weight > 0, which needs model.arch=ddt and objective=flow)"),
        (one_of("model.num_encoder_blocks"), arch == "ddt",
         f"the encoder/decoder split applies to model.arch=ddt only, and this model is model.arch={arch!r}"),
        (one_of("model.block_type", "model.scan_blocks", "model.remat_policy"), arch == "dit",
         "this setting applies to model.arch=dit only: a DDT (model.arch='ddt') has its own fixed blocks"),
        (one_of("model.learn_sigma"), arch == "dit" or not m.learn_sigma,
         "a DDT (model.arch='ddt') predicts the velocity only: model.learn_sigma must be False"),
        (one_of("data.name", "data.split", "data.data_dir"), source in ("tfds", "latents"),
         f"the TFDS dataset settings apply to data.source='tfds' (read) and 'latents' (recorded: the dataset the "
         f"latents come from) only, and this config reads data.source={source!r}"),
        (one_of("data.path"), source in ("folder", "latents"),
         f"data.path applies to data.source='folder' or 'latents' only, and this config reads data.source={source!r}"),
        (one_of("data.latent_scale", "data.vae"), source == "latents",
         f"this setting applies to data.source='latents' only (VAE latents; the trainer feeds every other source "
         f"as pixels), and this config reads data.source={source!r}"),
        (one_of("train.sample_every"), source != "latents" or config.train.sample_every == 0,
         "the trainer draws sample grids for pixel-space data only (decoding latents needs the VAE): sample a "
         "checkpoint with `dit-jax sample` instead"),
    ]


def inapplicable(config: ConfigDict, changed: Iterable[str]) -> list[str]:
    """'KEY: why' for each key of `changed` that the config's model, objective or data source does not use."""
    rules = _applicability(config)
    out = []
    for key in sorted(set(changed)):
        for matches, applies, why in rules:
            if matches(key) and not applies:
                out.append(f"{key}={_leaf(config, key)!r} does not apply: {why}")
                break
    return out


# ==========================================================================================================
# Impossible values
# ==========================================================================================================
def validate_config(config: ConfigDict, *, changed: Iterable[str] = ()) -> None:
    """Raise ConfigError listing every impossible setting, and every key of `changed` (the keys the command line
    changed) that does not apply to the chosen model, objective or data source. global_batch divisibility by the
    device count is `check_run`'s (the trainer knows the devices)."""
    from dit_jax.models.dit import BLOCK_TYPES, REMAT_POLICIES, decode_variant  # imports jax: keep it lazy
    from dit_jax.models.ddt import decode_ddt_variant
    from dit_jax.models.layers import ATTENTION_IMPLS

    errors: list[str] = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    def one_of(key: str, value: Any, allowed: Sequence[Any]) -> None:
        check(value in allowed, f"{key}={value!r} is not one of {tuple(allowed)}")

    m, d, data, o, t = config.model, config.diffusion, config.data, config.optim, config.train

    # --- every number finite (a config file can hold nan / inf; the override parser refuses them)
    for key in flat_keys(config):
        value = _leaf(config, key)
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{key}={value} must be a finite number")

    # --- model
    one_of("model.arch", m.arch, ARCHS)
    arch: dict[str, int] = {}
    try:
        arch = decode_ddt_variant(m.variant) if m.arch == "ddt" else decode_variant(m.variant)
    except ValueError as e:
        errors.append(f"model.variant: {e}")
    for k in ("depth", "hidden_size", "num_heads", "patch_size"):
        check(m[k] >= 0, f"model.{k}={m[k]} must be >= 0 (0 = the variant's)")
        if m[k] > 0:
            arch[k] = m[k]
    if arch:
        check(arch["hidden_size"] % arch["num_heads"] == 0,
              f"model hidden_size {arch['hidden_size']} is not divisible by num_heads {arch['num_heads']}")
        check(m.input_size > 0 and m.input_size % arch["patch_size"] == 0,
              f"model.input_size={m.input_size} is not a positive multiple of patch_size {arch['patch_size']}")
    check(m.in_channels > 0, f"model.in_channels={m.in_channels} must be > 0")
    check(m.num_classes > 0, f"model.num_classes={m.num_classes} must be > 0")
    check(0.0 <= m.class_dropout_prob < 1.0, f"model.class_dropout_prob={m.class_dropout_prob} must be in [0, 1)")
    one_of("model.block_type", m.block_type, BLOCK_TYPES)
    one_of("model.dtype", m.dtype, MODEL_DTYPES)
    one_of("model.attn_impl", m.attn_impl, ATTENTION_IMPLS)
    one_of("model.remat_policy", m.remat_policy, tuple(REMAT_POLICIES))

    # --- objective, DDT, flow, REPA
    one_of("objective", config.objective, OBJECTIVES)
    encoder_blocks = 0
    if m.arch == "ddt":
        check(config.objective == "flow", "model.arch=ddt trains with objective=flow")
        depth = max(arch.get("depth", 1), 1)
        check(0 <= m.num_encoder_blocks < depth,
              f"model.num_encoder_blocks={m.num_encoder_blocks} must be in [0, depth={depth}) (0 = the variant's)")
        encoder_blocks = min(m.num_encoder_blocks or arch.get("num_encoder_blocks", 0), depth - 1)
    if config.objective == "flow":
        one_of("flow.t_dist", config.flow.t_dist, FLOW_T_DISTS)
        check(config.flow.time_scale > 0, f"flow.time_scale={config.flow.time_scale} must be > 0")
        check(m.arch == "ddt" or not m.learn_sigma, "a DiT trained with objective=flow needs model.learn_sigma=False")
    r = config.repa
    check(r.weight >= 0, f"repa.weight={r.weight} must be >= 0 (0 = off)")
    if r.weight > 0:
        check(m.arch == "ddt" and config.objective == "flow", "repa.weight > 0 needs model.arch=ddt, objective=flow")
        if m.arch == "ddt":
            check(1 <= r.layer <= encoder_blocks,
                  f"repa.layer={r.layer} must be in [1, {encoder_blocks}] (a 1-based block of the model's "
                  f"{encoder_blocks} encoder blocks)")
        one_of("repa.encoder", r.encoder, REPA_ENCODERS)
        check(r.proj_dim > 0, f"repa.proj_dim={r.proj_dim} must be > 0")
        check(r.proj_hidden >= 0, f"repa.proj_hidden={r.proj_hidden} must be >= 0 (0 = the model width)")
        # repa.encoder_path is checked when a run starts fresh (a resume reads the encoder from the checkpoint),
        # and latent shards' images when the data is opened (extract-latents --store-images)

    # --- diffusion
    one_of("diffusion.noise_schedule", d.noise_schedule, NOISE_SCHEDULES)
    check(d.diffusion_steps > 0, f"diffusion.diffusion_steps={d.diffusion_steps} must be > 0")
    check(config.objective == "flow" or d.learn_sigma == m.learn_sigma,
          f"diffusion.learn_sigma={d.learn_sigma} disagrees with model.learn_sigma={m.learn_sigma}")
    check(re.fullmatch(r"|ddim\d+|\d+(,\d+)*", d.timestep_respacing) is not None,
          f"diffusion.timestep_respacing={d.timestep_respacing!r} must be '', 'ddimN' or counts like '250' / '10,15,20'")

    # --- data
    one_of("data.source", data.source, DATA_SOURCES)
    check(data.num_classes == m.num_classes,
          f"data.num_classes={data.num_classes} disagrees with model.num_classes={m.num_classes}")
    check(data.image_size > 0 and data.channels > 0, "data.image_size and data.channels must be > 0")
    check(data.num_workers >= 0, f"data.num_workers={data.num_workers} must be >= 0")
    check(data.prefetch >= 0, f"data.prefetch={data.prefetch} must be >= 0 (0 = no prefetch)")
    check(data.latent_scale > 0, f"data.latent_scale={data.latent_scale} must be > 0")
    pixel = m.input_size == data.image_size and m.in_channels == data.channels
    latent = m.input_size * VAE_DOWNSAMPLE == data.image_size and m.in_channels == VAE_CHANNELS
    if data.source == "digits":
        check(pixel, f"data.source='digits' trains in pixel space: model.input_size/in_channels "
                     f"({m.input_size}, {m.in_channels}) must equal data.image_size/channels ({data.image_size}, {data.channels})")
    elif data.source == "latents":
        check(latent, f"data.source='latents' needs model.input_size = data.image_size // {VAE_DOWNSAMPLE} "
                      f"({data.image_size // VAE_DOWNSAMPLE}) and model.in_channels = {VAE_CHANNELS}; "
                      f"got ({m.input_size}, {m.in_channels})")
    elif data.source in ("tfds", "folder"):
        check(pixel, f"data.source={data.source!r} yields {data.image_size}x{data.image_size}x{data.channels} images, "
                     f"and the trainer does not VAE-encode them on the fly: extract latents with `dit-jax "
                     f"extract-latents` and train with data.source='latents', or train in pixel space (model.input_size="
                     f"{data.image_size}, model.in_channels={data.channels})")
    # data.path / data_dir are checked when the data is opened (a runlocal smoke test may not have them).

    # --- optimizer
    check(o.lr >= 0, f"optim.lr={o.lr} must be >= 0")
    check(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optim.b1={o.b1} and optim.b2={o.b2} must be in [0, 1)")
    check(o.eps > 0, f"optim.eps={o.eps} must be > 0")
    check(o.grad_clip_norm >= 0, f"optim.grad_clip_norm={o.grad_clip_norm} must be >= 0 (0 = off)")
    check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    check(0 <= o.ema_decay <= 1, f"optim.ema_decay={o.ema_decay} must be in [0, 1]")

    # --- training loop
    check(t.global_batch > 0, f"train.global_batch={t.global_batch} must be > 0")
    check(t.steps >= 0, f"train.steps={t.steps} must be >= 0")
    check(t.log_every > 0, f"train.log_every={t.log_every} must be > 0")
    check(t.ckpt_every >= 0, f"train.ckpt_every={t.ckpt_every} must be >= 0 (0 = only at the end)")
    check(t.keep_ckpts >= 1, f"train.keep_ckpts={t.keep_ckpts} must be >= 1")
    check(t.sample_every >= 0, f"train.sample_every={t.sample_every} must be >= 0 (0 = off)")
    check(t.sample_cfg_scale >= 0, f"train.sample_cfg_scale={t.sample_cfg_scale} must be >= 0 (1 = no guidance)")
    if t.sample_every > 0:
        if config.objective == "diffusion":
            check(0 < t.sample_steps <= d.diffusion_steps,
                  f"train.sample_steps={t.sample_steps} must be in [1, diffusion.diffusion_steps={d.diffusion_steps}]")
        else:
            check(t.sample_steps > 0, f"train.sample_steps={t.sample_steps} must be > 0")
        check(t.sample_per_class > 0, f"train.sample_per_class={t.sample_per_class} must be > 0")
        check(0 < t.sample_num_classes <= m.num_classes,
              f"train.sample_num_classes={t.sample_num_classes} must be in [1, model.num_classes={m.num_classes}]")
        check(t.sample_cfg_scale == 1 or m.class_dropout_prob > 0,
              f"train.sample_cfg_scale={t.sample_cfg_scale} needs model.class_dropout_prob > 0 (classifier-free "
              f"guidance uses the null class, which a model trained without label dropout lacks): set "
              f"train.sample_cfg_scale=1")

    # --- mesh
    check(config.mesh.data == -1 or config.mesh.data >= 1, f"mesh.data={config.mesh.data} must be -1 (all) or >= 1")
    check(config.mesh.fsdp >= 1, f"mesh.fsdp={config.mesh.fsdp} must be >= 1")

    errors += inapplicable(config, changed)
    _raise(errors)


def check_run(config: ConfigDict, device_count: int) -> None:
    """What only a starting run can check: raise ConfigError unless the mesh (mesh.data x mesh.fsdp) covers the
    `device_count` devices of the job and train.global_batch splits evenly over them."""
    errors: list[str] = []
    data, fsdp = config.mesh.data, config.mesh.fsdp
    if fsdp >= 1 and device_count % fsdp:
        errors.append(f"mesh.fsdp={fsdp} does not divide the {device_count} devices of this job")
    elif data != -1 and data * fsdp != device_count:
        errors.append(f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp} devices, but this job has "
                      f"{device_count}: set mesh.data=-1 (every device not used by fsdp)")
    if config.train.global_batch % device_count:
        errors.append(f"train.global_batch={config.train.global_batch} is not divisible by the {device_count} "
                      f"devices of this job: use a multiple of {device_count}")
    _raise(errors)
