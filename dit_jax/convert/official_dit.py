"""facebookresearch/DiT state_dicts (models.py key layout) -> dit_jax.models.DiT.

Official keys (models.py: DiT, DiTBlock, FinalLayer, TimestepEmbedder, LabelEmbedder; timm PatchEmbed,
Attention and Mlp) and where they go:

    x_embedder.proj.weight (D, C, p, p)          -> x_embedder.proj.kernel (p, p, C, D)
    t_embedder.mlp.{0,2}.weight (out, in)        -> t_embedder.mlp.layers.{0,2}.kernel (in, out)
    y_embedder.embedding_table.weight (N+1, D)   -> y_embedder.embedding_table.embedding
    pos_embed (1, T, D)                          -> pos_embed (FixedEmbed; loaded as-is when present)
    blocks.{i}.attn.qkv / attn.proj / mlp.fc1 / mlp.fc2 / adaLN_modulation.1
                                                 -> blocks.{i}.… (adaLN_modulation.layers.1), kernels transposed
    final_layer.linear / final_layer.adaLN_modulation.1 -> the same names (adaLN_modulation.layers.1)

Every ".bias" goes to ".bias" unchanged. The LayerNorms have no parameters (elementwise_affine=False).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from dit_jax.convert.common import (
    Arch,
    arch_hint,
    assign,
    block_indices,
    check_keys,
    check_model_supported,
    model_to_numpy,
    to_numpy,
    unstacked_shapes,
    unwrap_checkpoint,
)
from dit_jax.models.dit import DiT

log = logging.getLogger("dit_jax.convert")

# How a tensor changes on the way in: torch Linear (out, in) -> kernel (in, out); torch Conv2d (O, I, kh, kw)
# -> flax Conv (kh, kw, I, O); or unchanged.
KINDS = ("linear", "conv", "copy")


def to_ours(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return x.T
    if kind == "conv":
        return x.transpose(2, 3, 1, 0)
    return x


def to_source(kind: str, x: np.ndarray) -> np.ndarray:
    """The inverse of `to_ours`."""
    if kind == "linear":
        return x.T
    if kind == "conv":
        return x.transpose(3, 2, 0, 1)
    return x


def source_shape(kind: str, ours: tuple[int, ...]) -> tuple[int, ...]:
    """The source (torch) shape that `to_ours(kind, ·)` turns into `ours`."""
    if kind == "linear":
        return tuple(reversed(ours))
    if kind == "conv":
        kh, kw, cin, cout = ours
        return (cout, cin, kh, kw)
    return tuple(ours)


def _param_pair(src: str, ours: str) -> list[tuple[str, str, str]]:
    """(source key, our name, kind) for a torch Linear `src` stored as nnx.Linear `ours`."""
    return [(f"{src}.weight", f"{ours}.kernel", "linear"), (f"{src}.bias", f"{ours}.bias", "copy")]


def official_key_table(depth: int) -> list[tuple[str, str, str]]:
    """(official key, our unstacked name, kind) for every parameter of an adaLN-Zero DiT of this depth,
    except pos_embed (optional, see load_official_dit)."""
    table = [
        ("x_embedder.proj.weight", "x_embedder.proj.kernel", "conv"),
        ("x_embedder.proj.bias", "x_embedder.proj.bias", "copy"),
        *_param_pair("t_embedder.mlp.0", "t_embedder.mlp.layers.0"),
        *_param_pair("t_embedder.mlp.2", "t_embedder.mlp.layers.2"),
        ("y_embedder.embedding_table.weight", "y_embedder.embedding_table.embedding", "copy"),
    ]
    for i in range(depth):
        b = f"blocks.{i}"
        for sub in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            table += _param_pair(f"{b}.{sub}", f"{b}.{sub}")
        table += _param_pair(f"{b}.adaLN_modulation.1", f"{b}.adaLN_modulation.layers.1")
    table += _param_pair("final_layer.linear", "final_layer.linear")
    table += _param_pair("final_layer.adaLN_modulation.1", "final_layer.adaLN_modulation.layers.1")
    return table


def infer_official_arch(state_dict: Mapping[str, Any]) -> Arch:
    """Architecture of an official-layout state_dict, from its shapes alone (None where unknown).

    num_heads cannot be seen in the shapes (the fused qkv is (3D, D) whatever the head count).
    """
    sd = state_dict

    def shape(key: str) -> tuple[int, ...] | None:
        return tuple(sd[key].shape) if key in sd else None

    depth = len(block_indices(sd, "blocks.")) or None
    hidden = patch = cin = cout = classes = size = mlp = None
    if (w := shape("x_embedder.proj.weight")) is not None and len(w) == 4:
        hidden, cin, patch = w[0], w[1], w[2]
    if (w := shape("y_embedder.embedding_table.weight")) is not None:
        classes, hidden = w[0] - 1, hidden or w[1]
    if (w := shape("final_layer.linear.weight")) is not None and patch:
        cout = w[0] // (patch * patch)
    if (w := shape("pos_embed")) is not None and len(w) == 3 and patch:
        grid = int(round(w[1] ** 0.5))
        size = grid * patch if grid * grid == w[1] else None
    if (w := shape("blocks.0.mlp.fc1.weight")) is not None:
        mlp = w[0]
    return Arch(depth, hidden, patch, cin, cout, classes, size, mlp)


def _hint(sd: Mapping[str, Any], model: DiT) -> str:
    if any(k.startswith("transformer_blocks.") or k.startswith("pos_embed.proj.") for k in sd):
        return (
            "the keys look like a diffusers DiTTransformer2DModel (transformer_blocks.*, pos_embed.proj.*): "
            "use dit_jax.convert.load_diffusers_dit or load_diffusers_dit_folder"
        )
    return arch_hint(infer_official_arch(sd), model)


def load_official_dit(model: DiT, state_dict: Mapping[str, Any], *, which: str = "ema") -> DiT:
    """Fill `model` in place from a facebookresearch/DiT state_dict and return it.

    state_dict: name -> numpy array or torch tensor, in the official key layout; a train.py checkpoint
    {"model", "ema", "opt", "args"} is unwrapped (`which` = "ema" by default, as the official sample.py does,
    or "model"), and "module." (DDP) / "_orig_mod." (torch.compile) prefixes are removed.

    The whole checkpoint is validated before the model is touched: one CheckpointMismatchError (a ValueError)
    names every missing, unexpected and mis-shaped key, with a hint when the shapes look like another variant.
    `pos_embed` is optional: when present it is loaded as-is (the EMA'd releases drift by ~1e-4 from the exact
    sin-cos table, and parity with them needs their copy); when absent the model keeps the exact table.

    The model may be unstacked or `scan_blocks=True` (blocks stacked on a leading depth axis), and may be
    abstract (from nnx.eval_shape): it is then made concrete, which skips a random initialisation.
    """
    check_model_supported(model)
    sd = unwrap_checkpoint(state_dict, which)
    shapes = unstacked_shapes(model)
    table = official_key_table(model.depth)
    required = {src: source_shape(kind, shapes[ours]) for src, ours, kind in table}
    optional = {"pos_embed": shapes["pos_embed"]}
    check_keys(sd, required, optional, hint=lambda: _hint(sd, model), what="official DiT checkpoint")

    values = {ours: to_ours(kind, to_numpy(sd[src])) for src, ours, kind in table}
    if "pos_embed" in sd:
        values["pos_embed"] = to_numpy(sd["pos_embed"])
    else:
        log.info("no pos_embed in the checkpoint: keeping the exact sin-cos table")
    assign(model, values)
    return model


def to_official_state_dict(model: DiT) -> dict[str, np.ndarray]:
    """The model's weights in the official key layout (the inverse of load_official_dit), pos_embed included:
    what the official models.py `DiT.load_state_dict` takes (after torch.from_numpy)."""
    check_model_supported(model)
    values = model_to_numpy(model)
    out = {src: to_source(kind, values[ours]) for src, ours, kind in official_key_table(model.depth)}
    out["pos_embed"] = np.asarray(values["pos_embed"], np.float32).reshape(1, -1, model.hidden_size)
    # C-contiguous and writable (torch.from_numpy wants both); copies only where needed
    return {k: np.require(v, requirements=["C", "W"]) for k, v in out.items()}
