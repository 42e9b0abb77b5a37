"""MCG-NJU/DDT checkpoints (decoupled_improved_dit.py key layout) -> dit_jax.models.ddt.DDT.

The released files (huggingface.co/MCG-NJU/DDT-XL-22en6de-R256, -R512) are Lightning checkpoints
{"state_dict": {"ema_denoiser.<key>", "denoiser.<key>", "diffusion_trainer.proj.<key>", ...}}; the reference's
app.py samples with the "ema_denoiser." weights, and so do we by default (which="model" takes "denoiser.").
Everything outside the chosen prefix (the REPA projector, the other copy, trainer state) is accepted and ignored.
A flat state dict of the denoiser alone is taken as it is.

Key map (ours <- theirs): Linear kernels are transposed weights ("<name>.kernel" <- "<name>.weight"),
nnx.Sequential's "layers.<i>" is torch's "<i>", the label table's "embedding" is "weight"; RMSNorm weights and
biases copy unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dit_jax.convert.common import (
    assign_torch_named,
    check_keys,
    torch_named_shapes,
    unwrap_checkpoint,
)
from dit_jax.models.ddt import DDT

PREFIXES = {"ema": "ema_denoiser.", "model": "denoiser."}


def source_name(ours: str) -> tuple[str, str]:
    """Our dotted variable name -> (reference key, kind) where kind "kernel" means a transposed Linear weight."""
    name = ours.replace(".layers.", ".")
    if name.endswith(".kernel"):
        return name[: -len(".kernel")] + ".weight", "kernel"
    if name.endswith(".embedding"):
        return name[: -len(".embedding")] + ".weight", "copy"
    return name, "copy"


def denoiser_state_dict(state_dict: Mapping[str, Any], which: str = "ema") -> dict[str, Any]:
    """The denoiser's flat state dict inside a Lightning checkpoint (or a flat dict as it is)."""
    if which not in PREFIXES:
        raise ValueError(f"which must be one of {sorted(PREFIXES)}, got {which!r}")
    sd = unwrap_checkpoint(state_dict)
    prefix = PREFIXES[which]
    if any(k.startswith(("ema_denoiser.", "denoiser.")) for k in sd):
        picked = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not picked:
            other = [p for p in PREFIXES.values() if any(k.startswith(p) for k in sd)]
            raise ValueError(f"the checkpoint has no {prefix!r} weights (it has {other}); pass which= accordingly")
        return picked
    return dict(sd)


def load_official_ddt(model: DDT, state_dict: Mapping[str, Any], *, which: str = "ema") -> DDT:
    """Fill `model` in place from a DDT checkpoint (see the module docstring) and return it. One ValueError names
    every missing, unexpected or mis-shaped key before anything is written."""
    if hasattr(model, "repa_proj"):
        raise ValueError("load_official_ddt fills a DDT built without the REPA projector (repa_dim=0): the released "
                         "projector is trainer state (diffusion_trainer.proj.*) and is not needed for sampling")
    sd = denoiser_state_dict(state_dict, which)
    required = torch_named_shapes(model, source_name)

    def hint() -> str:
        blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
        width = sd["x_embedder.proj.weight"].shape[0] if "x_embedder.proj.weight" in sd else None
        enc = "s_embedder.proj.weight" in sd
        return (f"the checkpoint has {len(blocks)} blocks, width {width}, {'an' if enc else 'no'} encoder "
                f"embedder; the model has depth {model.depth}, width {model.hidden_size}, "
                f"{model.num_encoder_blocks} encoder blocks")

    check_keys(sd, required, hint=hint, what="DDT checkpoint")
    assign_torch_named(model, sd, source_name)
    return model
