"""diffusers `AutoencoderKL` (the SD VAE: stabilityai/sd-vae-ft-ema, sd-vae-ft-mse, ...) -> dit_jax AutoencoderKL.

Our module tree mirrors diffusers' (see dit_jax/models/vae.py), so every key maps by name:

    <path>.weight  conv (O, I, kh, kw)   -> <path>.kernel (kh, kw, I, O)
    <path>.weight  linear (O, I)         -> <path>.kernel (I, O)      (attention to_q / to_k / to_v / to_out.0)
    <path>.weight  GroupNorm (C,)        -> <path>.scale
    <path>.bias                          -> <path>.bias

Attention key layouts accepted (diffusers ModelMixin._fix_state_dict_keys_on_load renames the legacy ones):
    current  {encoder,decoder}.mid_block.attentions.0.{group_norm, to_q, to_k, to_v, to_out.0}
    legacy   {encoder,decoder}.mid_block.attentions.0.{group_norm, query, key, value, proj_attn}
and the attention projection weights may be 1x1-conv shaped (O, I, 1, 1) (files converted from the original
CompVis checkpoints); they are squeezed to (O, I).

Files are read with numpy only (dit_jax.convert.common.read_safetensors); torch is never imported.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from dit_jax.convert.common import (
    read_config_json,
    read_safetensors_files,
    CONFIG_NAME,
    resolve_model_folder,
    CheckpointReadError,
    assign_torch_named,
    check_keys,
    to_numpy,
    torch_named_shapes,
    unwrap_checkpoint,
)
from dit_jax.models.vae import DOWN_BLOCK_TYPE, SD_VAE_SCALE, UP_BLOCK_TYPE, AutoencoderKL

log = logging.getLogger("dit_jax.convert")

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SUPPORTED_CLASSES = ("AutoencoderKL",)

# legacy attention name -> current name (diffusers modeling_utils._fix_state_dict_keys_on_load).
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_ATTN_WEIGHT_RE = re.compile(r"^.*\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")


# ----------------------------------------------------------------------------------------------------------
# Expected layout.
# ----------------------------------------------------------------------------------------------------------
def _source_name(ours: str) -> tuple[str, str]:
    """(diffusers key, kind) of one of our variable paths; kind is conv, linear, norm or bias."""
    stem, leaf = ours.rsplit(".", 1)
    if leaf == "bias":
        return f"{stem}.bias", "bias"
    if leaf == "scale":
        return f"{stem}.weight", "norm"
    if leaf == "kernel":
        return f"{stem}.weight", "kernel"
    raise RuntimeError(f"internal converter error: unexpected variable {ours!r} in the VAE")


def expected_diffusers_keys(model: AutoencoderKL) -> dict[str, tuple[int, ...]]:
    """diffusers key -> torch shape for every parameter of `model` (current attention names)."""
    return torch_named_shapes(model, _source_name)


def normalize_vae_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename legacy attention keys to the current names and squeeze 1x1-conv attention weights.

    Raises ValueError when a legacy key and its current name are both present (ambiguous checkpoint).
    """
    sd = unwrap_checkpoint(state_dict)
    out: dict[str, Any] = {}
    clashes = []
    for key, value in sd.items():
        m = _LEGACY_RE.match(key)
        new = f"{m.group(1)}.{LEGACY_ATTENTION_NAMES[m.group(2)]}.{m.group(3)}" if m else key
        if new in out or (m and new in sd):
            clashes.append(f"{key} -> {new}")
            continue
        out[new] = value
    if clashes:
        raise ValueError(
            "the VAE checkpoint holds both legacy and current names for the same attention weights: "
            + ", ".join(clashes)
        )
    for key in list(out):
        shape = tuple(out[key].shape)
        if _ATTN_WEIGHT_RE.match(key) and len(shape) == 4 and shape[2:] == (1, 1):
            out[key] = to_numpy(out[key]).reshape(shape[:2])
    return out


def _hint(sd: Mapping[str, Any], model: AutoencoderKL) -> str:
    keys = list(sd)
    if any(k.startswith("first_stage_model.") or ".down.0.block." in f".{k}" or k.startswith("encoder.down.")
           for k in keys):
        return (
            "the keys look like an original CompVis / LDM checkpoint (encoder.down.*.block.*, first_stage_model.*): "
            "convert it to the diffusers layout first (diffusers scripts/convert_vae_pt_to_diffusers.py, or "
            "AutoencoderKL.from_single_file(...).save_pretrained(..., safe_serialization=True))"
        )
    if any(k.startswith("vae.") for k in keys):
        return "the keys carry a 'vae.' prefix: pass the VAE's own state_dict (strip the prefix)"
    found = infer_diffusers_vae_arch(sd)
    mine = dict(
        block_out_channels=model.block_out_channels,
        layers_per_block=model.layers_per_block,
        latent_channels=model.latent_channels,
        in_channels=model.in_channels,
        out_channels=model.out_channels,
    )
    diffs = [f"{k} {v} (model: {mine[k]})" for k, v in found.items() if v is not None and v != mine[k]]
    if diffs:
        return "the checkpoint seems to be another VAE configuration: " + ", ".join(diffs)
    return ""


def infer_diffusers_vae_arch(sd: Mapping[str, Any]) -> dict[str, Any]:
    """What the shapes of a diffusers AutoencoderKL state_dict say about its config (None where unknown)."""

    def dim(key: str, axis: int) -> int | None:
        v = sd.get(key)
        return int(v.shape[axis]) if v is not None and len(v.shape) > axis else None

    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
    chans = [dim(f"encoder.down_blocks.{i}.resnets.0.conv1.weight", 0) for i in levels]
    resnets = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))}
    latent2 = dim("quant_conv.weight", 0)
    return dict(
        block_out_channels=tuple(chans) if chans and None not in chans else None,
        layers_per_block=len(resnets) or None,
        latent_channels=latent2 // 2 if latent2 else dim("post_quant_conv.weight", 0),
        in_channels=dim("encoder.conv_in.weight", 1),
        out_channels=dim("decoder.conv_out.weight", 0),
    )


# ----------------------------------------------------------------------------------------------------------
# Conversion.
# ----------------------------------------------------------------------------------------------------------
def load_diffusers_vae(model: AutoencoderKL, state_dict: Mapping[str, Any]) -> AutoencoderKL:
    """Fill `model` in place from a diffusers AutoencoderKL state_dict (numpy arrays or torch tensors) and return it.

    Accepts current and legacy attention names and 1x1-conv-shaped attention weights. Everything is validated
    before the model is touched: one CheckpointMismatchError names every missing, unexpected and mis-shaped key.
    Works on an abstract model (nnx.eval_shape) too.
    """
    if not isinstance(model, AutoencoderKL):
        raise TypeError(f"expected a dit_jax.models.vae.AutoencoderKL, got {type(model).__name__}")
    sd = normalize_vae_state_dict(state_dict)
    required = expected_diffusers_keys(model)
    check_keys(sd, required, hint=lambda: _hint(sd, model), what="diffusers AutoencoderKL checkpoint")
    assign_torch_named(model, sd, _source_name)
    return model


# ----------------------------------------------------------------------------------------------------------
# Config -> model.
# ----------------------------------------------------------------------------------------------------------
def vae_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """AutoencoderKL constructor arguments for a diffusers AutoencoderKL config.json.

    ValueError naming every field our model cannot represent (other block types, activations, no quant convs,
    no mid-block attention, ...).
    """
    cfg = dict(config)
    problems = []
    cls = cfg.get("_class_name")
    if cls is not None and cls not in SUPPORTED_CLASSES:
        problems.append(f"_class_name {cls!r} (expected one of {SUPPORTED_CLASSES})")
    chans = tuple(int(c) for c in cfg.get("block_out_channels", (64,)))
    down = tuple(cfg.get("down_block_types", (DOWN_BLOCK_TYPE,)))
    up = tuple(cfg.get("up_block_types", (UP_BLOCK_TYPE,)))
    if any(t != DOWN_BLOCK_TYPE for t in down):
        problems.append(f"down_block_types={list(down)} (only {DOWN_BLOCK_TYPE!r} is supported)")
    if any(t != UP_BLOCK_TYPE for t in up):
        problems.append(f"up_block_types={list(up)} (only {UP_BLOCK_TYPE!r} is supported)")
    if len(down) != len(chans) or len(up) != len(chans):
        problems.append(
            f"{len(down)} down and {len(up)} up block types for {len(chans)} block_out_channels (must be equal)"
        )
    checks = {
        "act_fn": "silu",
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }
    for key, want in checks.items():
        got = cfg.get(key, want)
        if got is not None and got != want:
            problems.append(f"{key}={got!r} (supported: {want!r})")
    groups = int(cfg.get("norm_num_groups", 32))
    if any(c % groups for c in chans):
        problems.append(f"block_out_channels {list(chans)} are not all multiples of norm_num_groups {groups}")
    if problems:
        raise ValueError("unsupported diffusers AutoencoderKL config: " + "; ".join(problems))
    for key in ("shift_factor", "latents_mean", "latents_std"):
        if cfg.get(key) is not None:
            log.warning("diffusers VAE config sets %s=%r: latent normalisation is the caller's job", key, cfg[key])
    return dict(
        block_out_channels=chans,
        layers_per_block=int(cfg.get("layers_per_block", 1)),
        latent_channels=int(cfg.get("latent_channels", 4)),
        norm_num_groups=groups,
        in_channels=int(cfg.get("in_channels", 3)),
        out_channels=int(cfg.get("out_channels", 3)),
    )


def resolve_vae_folder(path: str | os.PathLike) -> Path:
    """The folder holding the VAE's config.json: `path` itself, or a pipeline's vae/ folder."""
    return Path(resolve_model_folder(path, "vae", "VAE"))


def read_diffusers_vae_folder(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config, state_dict as numpy) of a diffusers AutoencoderKL folder, with numpy only (no torch)."""
    folder = resolve_vae_folder(path)
    config = read_config_json(folder / CONFIG_NAME)
    if (folder / WEIGHTS_NAME).is_file():
        files = [folder / WEIGHTS_NAME]
    elif (folder / WEIGHTS_INDEX_NAME).is_file():
        try:
            shards = sorted(set(json.loads((folder / WEIGHTS_INDEX_NAME).read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise CheckpointReadError(f"{folder / WEIGHTS_INDEX_NAME}: cannot read the shard index ({e})") from e
        files = [folder / s for s in shards]
    else:
        found = sorted(x.name for x in folder.iterdir())
        raise CheckpointReadError(
            f"{folder}: no {WEIGHTS_NAME} (found {found}); .bin weights would need torch: re-save the VAE with "
            "save_pretrained(safe_serialization=True)"
        )
    state = read_safetensors_files(files)
    return config, state


def load_diffusers_vae_folder(path: str | os.PathLike, *, dtype: Any = None) -> AutoencoderKL:
    """Build the AutoencoderKL that `path`/config.json describes and load its safetensors weights (numpy only).

    `path` is a VAE folder (config.json + diffusion_pytorch_model.safetensors) or a pipeline folder with vae/.
    The model is built abstractly (no random init) and filled by load_diffusers_vae. dtype: compute dtype.
    The config's scaling_factor is kept as `model.scaling_factor` (0.18215, SD_VAE_SCALE, for the SD VAE).
    """
    config, state = read_diffusers_vae_folder(path)
    kwargs = vae_kwargs_from_diffusers_config(config)
    model = nnx.eval_shape(lambda: AutoencoderKL(**kwargs, dtype=dtype, rngs=nnx.Rngs(0)))
    load_diffusers_vae(model, state)
    scale = config.get("scaling_factor", SD_VAE_SCALE)
    model.scaling_factor = float(scale if scale is not None else SD_VAE_SCALE)
    return model
