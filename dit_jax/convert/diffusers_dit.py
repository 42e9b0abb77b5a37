"""diffusers `DiTTransformer2DModel` (and the older `Transformer2DModel` with patch_size) -> dit_jax DiT.

Layout, read from diffusers 0.42 (models/transformers/dit_transformer_2d.py, attention.py
BasicTransformerBlock, normalization.py AdaLayerNormZero, embeddings.py PatchEmbed, Timesteps,
TimestepEmbedding, LabelEmbedding, CombinedTimestepLabelEmbeddings) and scripts/convert_dit_to_diffusers.py:

    pos_embed.proj.weight (D, C, p, p)                       -> x_embedder.proj.kernel (p, p, C, D)
    pos_embed.pos_embed (1, T, D), only when persistent       -> pos_embed; PatchEmbed registers the sin-cos
        table as a non-persistent buffer unless pos_embed_max_size is set, so DiT folders do not have it and
        the model keeps its exact table (diffusers' table is the same MAE formula; tests compare the two)
    transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_{1,2} -> t_embedder.mlp.layers.{0,2}
    transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table -> y_embedder.embedding_table
        diffusers keeps a copy of the shared t/y embedders in every block (the conversion script writes the
        same tensors into each): all copies must agree, and block 0's is used (as DiTTransformer2DModel's
        final layer does)
    transformer_blocks.{i}.norm1.linear (6D, D)              -> blocks.{i}.adaLN_modulation.layers.1
        AdaLayerNormZero.forward chunks it as shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp,
        the official order, so it is copied as is
    transformer_blocks.{i}.attn1.to_q / to_k / to_v          -> blocks.{i}.attn.qkv, fused as [q | k | v]
        (each head-major: diffusers views (B, T, heads, head_dim), timm reshapes (B, T, 3, heads, head_dim))
    transformer_blocks.{i}.attn1.to_out.0                    -> blocks.{i}.attn.proj
    transformer_blocks.{i}.ff.net.0.proj / ff.net.2          -> blocks.{i}.mlp.fc1 / fc2 (GELU tanh in between)
    proj_out_1 (2D, D)                                        -> final_layer.adaLN_modulation.layers.1
        DiTTransformer2DModel.forward: `shift, scale = proj_out_1(silu(c)).chunk(2)`: the official order
    proj_out_2                                                -> final_layer.linear

Numerical differences of diffusers' DiT from the official model (our DiT follows the official one):
  * Timesteps(downscale_freq_shift=1): frequencies exp(-ln(10000) k / (half - 1)) instead of / half. The
    released weights were trained with the official formula, so keep `timestep_freq_shift=0` (the default)
    unless the weights were trained with diffusers' code.
  * the MLP pre-norm (norm3) uses config.norm_eps, 1e-5 by default and in the hub DiT configs, vs 1e-6.
"""

from __future__ import annotations

import json
import logging
import os
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
    Arch,
    CheckpointReadError,
    arch_hint,
    assign,
    block_indices,
    check_keys,
    check_model_supported,
    read_safetensors,
    to_numpy,
    unstacked_shapes,
    unwrap_checkpoint,
)
from dit_jax.convert.official_dit import source_shape, to_ours
from dit_jax.models.dit import DiT

log = logging.getLogger("dit_jax.convert")

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SUPPORTED_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")

# The per-block copies of the shared embedders: (suffix under transformer_blocks.{i}.norm1.emb, our name, kind).
EMBEDDER_TABLE = [
    ("timestep_embedder.linear_1.weight", "t_embedder.mlp.layers.0.kernel", "linear"),
    ("timestep_embedder.linear_1.bias", "t_embedder.mlp.layers.0.bias", "copy"),
    ("timestep_embedder.linear_2.weight", "t_embedder.mlp.layers.2.kernel", "linear"),
    ("timestep_embedder.linear_2.bias", "t_embedder.mlp.layers.2.bias", "copy"),
    ("class_embedder.embedding_table.weight", "y_embedder.embedding_table.embedding", "copy"),
]
# Per-block parameters mapped one to one: (suffix under transformer_blocks.{i}, our suffix under blocks.{i}).
BLOCK_LINEARS = [
    ("norm1.linear", "adaLN_modulation.layers.1"),
    ("attn1.to_out.0", "attn.proj"),
    ("ff.net.0.proj", "mlp.fc1"),
    ("ff.net.2", "mlp.fc2"),
]


class EmbedderCopiesDisagreeError(ValueError):
    """The per-block copies of the shared timestep / label embedders differ."""


# ----------------------------------------------------------------------------------------------------------
# Expected layout.
# ----------------------------------------------------------------------------------------------------------
def _expected(model: DiT) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(required key -> torch shape, optional key -> shape) of the diffusers checkpoint for `model`."""
    s = unstacked_shapes(model)
    d = model.hidden_size
    req: dict[str, tuple[int, ...]] = {
        "pos_embed.proj.weight": source_shape("conv", s["x_embedder.proj.kernel"]),
        "pos_embed.proj.bias": s["x_embedder.proj.bias"],
    }
    for i in range(model.depth):
        tb, ob = f"transformer_blocks.{i}", f"blocks.{i}"
        for suffix, ours, kind in EMBEDDER_TABLE:
            req[f"{tb}.norm1.emb.{suffix}"] = source_shape(kind, s[ours])
        for src, ours in BLOCK_LINEARS:
            req[f"{tb}.{src}.weight"] = source_shape("linear", s[f"{ob}.{ours}.kernel"])
            req[f"{tb}.{src}.bias"] = s[f"{ob}.{ours}.bias"]
        for name in ("to_q", "to_k", "to_v"):
            req[f"{tb}.attn1.{name}.weight"] = (d, d)
            req[f"{tb}.attn1.{name}.bias"] = (d,)
    req["proj_out_1.weight"] = source_shape("linear", s["final_layer.adaLN_modulation.layers.1.kernel"])
    req["proj_out_1.bias"] = s["final_layer.adaLN_modulation.layers.1.bias"]
    req["proj_out_2.weight"] = source_shape("linear", s["final_layer.linear.kernel"])
    req["proj_out_2.bias"] = s["final_layer.linear.bias"]
    return req, {"pos_embed.pos_embed": s["pos_embed"]}


def infer_diffusers_arch(state_dict: Mapping[str, Any]) -> Arch:
    """Architecture of a diffusers-layout DiT state_dict from its shapes (None where unknown)."""
    sd = state_dict

    def shape(key: str) -> tuple[int, ...] | None:
        return tuple(sd[key].shape) if key in sd else None

    depth = len(block_indices(sd, "transformer_blocks.")) or None
    hidden = patch = cin = cout = classes = mlp = None
    if (w := shape("pos_embed.proj.weight")) is not None and len(w) == 4:
        hidden, cin, patch = w[0], w[1], w[2]
    if (w := shape("transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight")) is not None:
        classes = w[0] - 1
    if (w := shape("proj_out_2.weight")) is not None and patch:
        cout = w[0] // (patch * patch)
    if (w := shape("transformer_blocks.0.ff.net.0.proj.weight")) is not None:
        mlp = w[0]
    return Arch(depth, hidden, patch, cin, cout, classes, None, mlp)


def _hint(sd: Mapping[str, Any], model: DiT) -> str:
    if any(k.startswith("blocks.") or k.startswith("x_embedder.") for k in sd):
        return "the keys look like an official DiT state_dict (blocks.*, x_embedder.*): use load_official_dit"
    return arch_hint(infer_diffusers_arch(sd), model)


# ----------------------------------------------------------------------------------------------------------
# Conversion.
# ----------------------------------------------------------------------------------------------------------
def _check_embedder_copies(sd: Mapping[str, Any], depth: int, atol: float) -> None:
    for suffix, _, _ in EMBEDDER_TABLE:
        ref = to_numpy(sd[f"transformer_blocks.0.norm1.emb.{suffix}"])
        for i in range(1, depth):
            key = f"transformer_blocks.{i}.norm1.emb.{suffix}"
            other = to_numpy(sd[key])
            diff = float(np.max(np.abs(other.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
            if not diff <= atol:  # also catches NaN
                raise EmbedderCopiesDisagreeError(
                    f"the diffusers checkpoint's copies of the shared timestep/label embedders disagree: block {i} "
                    f"differs from block 0 ({key}: max abs difference {diff:.3g} > atol {atol:g}). DiT has one "
                    "embedder shared by all blocks, so this checkpoint (e.g. fine-tuned in diffusers, where each "
                    "copy trains separately) has no exact DiT equivalent; pass embedder_atol to accept block 0's "
                    "copy anyway"
                )


def load_diffusers_dit(model: DiT, state_dict: Mapping[str, Any], *, embedder_atol: float = 0.0) -> DiT:
    """Fill `model` in place from a diffusers DiTTransformer2DModel state_dict and return it.

    state_dict: name -> numpy array or torch tensor (diffusers key layout; "module." prefixes are removed).
    Validates everything first: one CheckpointMismatchError lists every missing, unexpected and mis-shaped key
    (with a variant hint), and EmbedderCopiesDisagreeError names the first block whose embedder copy differs
    from block 0's by more than `embedder_atol`. pos_embed.pos_embed is loaded when present (persistent
    buffer), else the model's exact sin-cos table stays.

    The model's timestep embedding formula is not changed: diffusers' code uses downscale_freq_shift=1 where
    the official DiT (and our default timestep_freq_shift=0) divides by half; weights converted from the
    official release want the official formula.
    """
    check_model_supported(model)
    sd = unwrap_checkpoint(state_dict)
    required, optional = _expected(model)
    check_keys(sd, required, optional, hint=lambda: _hint(sd, model), what="diffusers DiT checkpoint")
    _check_embedder_copies(sd, model.depth, embedder_atol)

    values: dict[str, np.ndarray] = {
        "x_embedder.proj.kernel": to_ours("conv", to_numpy(sd["pos_embed.proj.weight"])),
        "x_embedder.proj.bias": to_numpy(sd["pos_embed.proj.bias"]),
        "final_layer.adaLN_modulation.layers.1.kernel": to_numpy(sd["proj_out_1.weight"]).T,
        "final_layer.adaLN_modulation.layers.1.bias": to_numpy(sd["proj_out_1.bias"]),
        "final_layer.linear.kernel": to_numpy(sd["proj_out_2.weight"]).T,
        "final_layer.linear.bias": to_numpy(sd["proj_out_2.bias"]),
    }
    for suffix, ours, kind in EMBEDDER_TABLE:
        values[ours] = to_ours(kind, to_numpy(sd[f"transformer_blocks.0.norm1.emb.{suffix}"]))
    for i in range(model.depth):
        tb, ob = f"transformer_blocks.{i}", f"blocks.{i}"
        for src, ours in BLOCK_LINEARS:
            values[f"{ob}.{ours}.kernel"] = to_numpy(sd[f"{tb}.{src}.weight"]).T
            values[f"{ob}.{ours}.bias"] = to_numpy(sd[f"{tb}.{src}.bias"])
        # Fused qkv (3D, D) = [to_q; to_k; to_v], the inverse of convert_dit_to_diffusers.py's torch.chunk.
        qkv_w = np.concatenate([to_numpy(sd[f"{tb}.attn1.to_{n}.weight"]) for n in "qkv"], axis=0)
        qkv_b = np.concatenate([to_numpy(sd[f"{tb}.attn1.to_{n}.bias"]) for n in "qkv"], axis=0)
        values[f"{ob}.attn.qkv.kernel"] = qkv_w.T
        values[f"{ob}.attn.qkv.bias"] = qkv_b
    if "pos_embed.pos_embed" in sd:
        values["pos_embed"] = to_numpy(sd["pos_embed.pos_embed"])
    assign(model, values)
    return model


# ----------------------------------------------------------------------------------------------------------
# Config -> model.
# ----------------------------------------------------------------------------------------------------------
def dit_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """DiT constructor arguments for a diffusers DiT config.json; ValueError for what DiT cannot represent."""
    cfg = dict(config)
    problems = []
    cls = cfg.get("_class_name")
    if cls is not None and cls not in SUPPORTED_CLASSES:
        problems.append(f"_class_name {cls!r} (expected one of {SUPPORTED_CLASSES})")

    def get(key: str, default: Any) -> Any:
        value = cfg.get(key, default)
        return default if value is None and default is not None else value

    checks = {
        "norm_type": ("ada_norm_zero", get("norm_type", "ada_norm_zero")),
        "activation_fn": ("gelu-approximate", get("activation_fn", "gelu-approximate")),
        "attention_bias": (True, get("attention_bias", True)),
        "norm_elementwise_affine": (False, get("norm_elementwise_affine", False)),
    }
    for key, (want, got) in checks.items():
        if got != want:
            problems.append(f"{key}={got!r} (DiT needs {want!r})")
    patch = cfg.get("patch_size", 2 if cls == "DiTTransformer2DModel" else None)
    if patch is None:
        problems.append("patch_size is null (a latent-pixel or vector Transformer2DModel, not a DiT)")
    for key in ("num_vector_embeds", "cross_attention_dim", "caption_channels"):
        if cfg.get(key) is not None:
            problems.append(f"{key}={cfg[key]!r} (DiT has no {key})")
    if cfg.get("use_linear_projection") or cfg.get("only_cross_attention") or cfg.get("double_self_attention"):
        problems.append("use_linear_projection/only_cross_attention/double_self_attention are not DiT options")
    heads = int(get("num_attention_heads", 16))
    head_dim = int(get("attention_head_dim", 72))
    in_ch = int(get("in_channels", 4))
    out_ch = cfg.get("out_channels")
    out_ch = in_ch if out_ch is None else int(out_ch)
    if out_ch not in (in_ch, 2 * in_ch):
        problems.append(f"out_channels={out_ch} (DiT outputs in_channels={in_ch} or 2x with learned sigma)")
    classes = cfg.get("num_embeds_ada_norm", 1000)
    if classes is None:
        problems.append("num_embeds_ada_norm is null (DiT needs the number of classes)")
    sample = int(get("sample_size", 32))
    if patch is not None and sample % int(patch):
        problems.append(f"sample_size {sample} is not divisible by patch_size {patch}")
    if problems:
        raise ValueError("unsupported diffusers config for dit_jax DiT: " + "; ".join(problems))
    eps = cfg.get("norm_eps", 1e-5)
    if eps is not None and float(eps) != 1e-6:
        log.info(
            "diffusers config norm_eps=%g applies to the MLP pre-norm only; the official DiT (and ours) uses 1e-6",
            float(eps),
        )
    return dict(
        input_size=sample,
        patch_size=int(patch),
        in_channels=in_ch,
        hidden_size=heads * head_dim,
        depth=int(get("num_layers", 28)),
        num_heads=heads,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,  # CombinedTimestepLabelEmbeddings: LabelEmbedding(..., 0.1): table has N + 1 rows
        num_classes=int(classes),
        learn_sigma=out_ch == 2 * in_ch,
    )


def dit_from_diffusers_config(
    config: Mapping[str, Any] | str | os.PathLike,
    *,
    abstract: bool = False,
    rngs: nnx.Rngs | None = None,
    **overrides: Any,
) -> DiT:
    """Build the DiT that a diffusers config describes (a dict, a config.json path or its folder).

    abstract=True returns an nnx.eval_shape model (no random init; load_diffusers_dit makes it concrete).
    overrides go to the DiT constructor (dtype, attn_impl, scan_blocks, timestep_freq_shift, ...).
    """
    if not isinstance(config, Mapping):
        config = read_diffusers_config(config)
    kwargs = dit_kwargs_from_diffusers_config(config)
    kwargs.update(overrides)
    if abstract:
        return nnx.eval_shape(lambda: DiT(**kwargs, rngs=nnx.Rngs(0)))
    return DiT(**kwargs, rngs=rngs if rngs is not None else nnx.Rngs(0))


# ----------------------------------------------------------------------------------------------------------
# Folders.
# ----------------------------------------------------------------------------------------------------------
def resolve_diffusers_folder(path: str | os.PathLike) -> Path:
    """The folder holding the transformer's config.json: `path` itself, or a pipeline's transformer/ folder."""
    return Path(resolve_model_folder(path, "transformer", "model"))


def read_diffusers_config(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    file = p if p.is_file() else resolve_diffusers_folder(p) / CONFIG_NAME
    return read_config_json(file)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a diffusers model folder: one file, or the shards of an index json."""
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise CheckpointReadError(f"{index}: cannot read the shard index ({e})") from e
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointReadError(f"{folder}: shards listed in {WEIGHTS_INDEX_NAME} are missing: {missing}")
        return [folder / s for s in shards]
    found = sorted(x.name for x in folder.iterdir())
    raise CheckpointReadError(
        f"{folder}: no {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME} (found {found}); .bin weights would need torch: "
        "re-save the model with save_pretrained(safe_serialization=True)"
    )


def read_diffusers_folder(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray], list[Path]]:
    """(config, state_dict as numpy, weight files read) of a diffusers DiT folder. numpy only, no torch."""
    folder = resolve_diffusers_folder(path)
    config = read_diffusers_config(folder)
    files = weight_files(folder)
    state = read_safetensors_files(files)
    return config, state, files


def load_diffusers_dit_folder(model: DiT | None, path: str | os.PathLike, **kwargs: Any) -> DiT:
    """Load a diffusers DiT folder (config.json + diffusion_pytorch_model.safetensors, or sharded with an
    index json; a pipeline folder's transformer/ is found too) into `model`, with numpy only.

    model=None builds the model from config.json (abstractly, so there is no random init). The config is
    checked against a given model. kwargs go to load_diffusers_dit (embedder_atol).
    """
    config, state, _ = read_diffusers_folder(path)
    want = dit_kwargs_from_diffusers_config(config)
    if model is None:
        model = dit_from_diffusers_config(config, abstract=True)
    else:
        mine = {k: getattr(model, k) for k in ("input_size", "num_heads", "learn_sigma")}
        diff = {k: (want[k], v) for k, v in mine.items() if want[k] != v}
        if diff:
            raise ValueError(
                f"{path}: config.json describes another model: " + ", ".join(
                    f"{k} {a} in config vs {b} in model" for k, (a, b) in diff.items()
                )
            )
    return load_diffusers_dit(model, state, **kwargs)
