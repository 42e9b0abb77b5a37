"""DINOv2 weights (facebookresearch/dinov2 layout) -> dit_jax.models.dinov2.DinoViT.

The REPA encoder of DDT is torch hub's `dinov2_vitb14`, whose weights are `dinov2_vitb14_pretrain.pth`
(https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth, a flat state_dict). Download it
yourself and pass its local path: nothing here touches the network. A .pth/.pt is read by dit_jax.convert.pt_reader
(torch.load(weights_only=True), never full unpickling); the same tensors as .safetensors are read with numpy alone.

Key layout (dinov2/models/vision_transformer.py with block_chunks=0, as the hub models; our tree mirrors it):

    cls_token                   (1, 1, D)         -> cls_token
    pos_embed                   (1, 1 + G*G, D)   -> pos_embed                 (G = 37 for the 518 px models)
    mask_token                  (1, D)            -> mask_token                (unused at inference)
    patch_embed.proj.weight     (D, 3, p, p)      -> patch_embed.proj.kernel (p, p, 3, D)
    patch_embed.proj.bias       (D,)              -> patch_embed.proj.bias
    blocks.i.norm1.weight/bias  (D,)              -> blocks.i.norm1.scale / .bias
    blocks.i.attn.qkv.weight    (3D, D)           -> blocks.i.attn.qkv.kernel (D, 3D)    (+ .bias (3D,))
    blocks.i.attn.proj.weight   (D, D)            -> blocks.i.attn.proj.kernel (D, D)    (+ .bias)
    blocks.i.ls1.gamma          (D,)              -> blocks.i.ls1.gamma
    blocks.i.norm2.weight/bias  (D,)              -> blocks.i.norm2.scale / .bias
    blocks.i.mlp.fc1.weight     (4D, D)           -> blocks.i.mlp.fc1.kernel (D, 4D)     (+ .bias)
    blocks.i.mlp.fc2.weight     (D, 4D)           -> blocks.i.mlp.fc2.kernel (4D, D)     (+ .bias)
    blocks.i.ls2.gamma          (D,)              -> blocks.i.ls2.gamma
    norm.weight/bias            (D,)              -> norm.scale / .bias
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from flax import nnx

from dit_jax.convert.common import (
    assign_torch_named,
    block_indices,
    check_keys,
    torch_named_shapes,
    unwrap_checkpoint,
)
from dit_jax.models.dinov2 import DinoViT

WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"
HEAD_DIM = 64  # every DINOv2 model has 64-dimensional heads (ViT-S 6, B 12, L 16, g 24 heads)

# our leaf name -> (torch leaf name, kind); "kernel" leaves are transposed (common.from_torch_layout)
_LEAVES = {
    "kernel": ("weight", "kernel"),
    "scale": ("weight", "plain"),
    "bias": ("bias", "plain"),
    "gamma": ("gamma", "plain"),
}
_TOP = ("cls_token", "pos_embed", "mask_token")


def _source_name(ours: str) -> tuple[str, str]:
    """(official key, kind) of one of our variable paths."""
    if ours in _TOP:
        return ours, "plain"
    stem, leaf = ours.rsplit(".", 1)
    if leaf not in _LEAVES:
        raise RuntimeError(f"internal converter error: unexpected variable {ours!r} in DinoViT")
    name, kind = _LEAVES[leaf]
    return f"{stem}.{name}", kind


def expected_dinov2_keys(model: DinoViT) -> dict[str, tuple[int, ...]]:
    """Official key -> torch shape for every parameter of `model`."""
    return torch_named_shapes(model, _source_name)


def infer_dinov2_arch(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """DinoViT keyword arguments that the shapes of an official state_dict imply (those it can tell).

    depth = number of blocks.<i>, width = cls_token / patch conv channels, num_heads = width // 64 (DINOv2's
    head size; shapes cannot tell it), patch_size = the conv's kernel, in_channels = its input channels,
    pos_grid = sqrt(pos_embed rows - 1), mlp_ratio = fc1 rows / width.
    """
    sd = state_dict
    kw: dict[str, Any] = {}
    depth = len(block_indices(sd, "blocks."))
    if depth:
        kw["depth"] = depth
    conv = sd.get("patch_embed.proj.weight")
    width = None
    if conv is not None and len(conv.shape) == 4:
        width = int(conv.shape[0])
        kw["in_channels"] = int(conv.shape[1])
        kw["patch_size"] = int(conv.shape[2])
    elif "cls_token" in sd:
        width = int(sd["cls_token"].shape[-1])
    if width is not None:
        kw["width"] = width
        kw["num_heads"] = max(width // HEAD_DIM, 1)
    pos = sd.get("pos_embed")
    if pos is not None and len(pos.shape) == 3:
        grid = math.isqrt(max(int(pos.shape[1]) - 1, 0))
        if grid * grid == int(pos.shape[1]) - 1:
            kw["pos_grid"] = grid
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None and width:
        kw["mlp_ratio"] = int(fc1.shape[0]) / width
    return kw


def _hint(sd: Mapping[str, Any], model: DinoViT) -> str:
    keys = list(sd)
    notes = []
    if "register_tokens" in sd:
        notes.append(
            "this is a DINOv2 *with registers* (dinov2_vit*14_reg): DDT's REPA uses the plain model "
            "(dinov2_vitb14, no registers), which DinoViT implements"
        )
    if any(k.startswith("blocks.") and k.split(".")[2].isdigit() for k in keys if k.count(".") >= 3):
        notes.append(
            "the blocks are chunked (blocks.<chunk>.<i>.…, a training checkpoint with block_chunks > 0): "
            "flatten them to blocks.<i>.… first"
        )
    if any(k.startswith(("teacher.", "student.")) for k in keys):
        notes.append("this is a DINOv2 training checkpoint: take the teacher.backbone.* weights without the prefix")
    if any(".w12." in k or ".w3." in k for k in keys):
        notes.append("the MLPs are SwiGLU (ViT-g/14): not supported, DinoViT has a GELU MLP")
    arch = infer_dinov2_arch(sd)
    mine = dict(depth=model.depth, width=model.width, patch_size=model.patch_size, pos_grid=model.pos_grid,
                mlp_ratio=model.mlp_ratio, in_channels=model.in_channels)
    diffs = [f"{k} {arch[k]} (model: {v})" for k, v in mine.items() if k in arch and arch[k] != v]
    if diffs:
        notes.append(
            f"the checkpoint's architecture differs from the model's: {', '.join(diffs)}; "
            "load_dinov2_file builds the model from the file's shapes"
        )
    return "; ".join(notes)


def load_dinov2(model: DinoViT, state_dict: Mapping[str, Any]) -> DinoViT:
    """Fill `model` in place from an official DINOv2 state_dict (numpy arrays or torch tensors).

    Everything is validated before the model is touched: one CheckpointMismatchError (a ValueError) names every
    missing, unexpected and mis-shaped key. "module." / "_orig_mod." prefixes are removed. Works on an abstract
    model (nnx.eval_shape) too. Returns the model.
    """
    if not isinstance(model, DinoViT):
        raise TypeError(f"expected a dit_jax.models.dinov2.DinoViT, got {type(model).__name__}")
    sd = unwrap_checkpoint(state_dict)
    check_keys(sd, expected_dinov2_keys(model), hint=lambda: _hint(sd, model), what="DINOv2 state_dict")
    assign_torch_named(model, sd, _source_name)
    return model


def load_dinov2_file(path: str | os.PathLike, **model_kwargs: Any) -> DinoViT:
    """A DinoViT with the weights of a local .pth/.pt (needs torch) or .safetensors file, e.g. torch hub's
    dinov2_vitb14_pretrain.pth (see the module docstring; nothing is downloaded).

    The architecture is inferred from the shapes (infer_dinov2_arch: depth, width, heads = width // 64, patch,
    position grid, MLP ratio); `model_kwargs` override it (e.g. num_heads). The model is built abstractly (no random
    init) and filled by load_dinov2. Raises CheckpointReadError for a missing or unreadable file and
    CheckpointMismatchError when the keys do not fit.
    """
    from dit_jax.convert.pt_reader import read_state_dict

    state = read_state_dict(path)
    kw = infer_dinov2_arch(state)
    kw.update(model_kwargs)
    needed = ("depth", "width", "num_heads", "patch_size", "pos_grid")
    lacking = [k for k in needed if k not in kw]
    if lacking:
        raise ValueError(
            f"{path}: cannot tell {', '.join(lacking)} from the file (is it a DINOv2 state_dict? it needs "
            "blocks.<i>.*, patch_embed.proj.weight and a square pos_embed); pass them as keyword arguments"
        )
    model = nnx.eval_shape(lambda: DinoViT(rngs=nnx.Rngs(0), **kw))
    return load_dinov2(model, state)
