"""REPA (representation alignment, Yu et al. 2024) as DDT trains with it (MCG-NJU/DDT training_repa.py).

The output h of encoder block `align_layer` (1-based) goes through the projector MLP
    Linear(D, H) - SiLU - Linear(H, H) - SiLU - Linear(H, Z)
and is aligned token by token to a frozen target encoder's patch features (DINOv2 ViT-B/14, Z = 768) of the clean
image: loss = mean over tokens of 1 - cos(proj(h), target), weighted by repa.weight (0.5) and added to the flow
loss. Cosine similarities are computed in float32. When the token grids differ, the target grid is resized to the
model's with bilinear interpolation (align_corners=False), as the reference does.

Gradients: the target features are wrapped in stop_gradient (the encoder is frozen and receives nothing), and the
projector reads block `align_layer`'s output, so only that block and those before it (plus the embedders) get
REPA gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dit_jax.models.ddt import Projector


def match_token_grid(target: jax.Array, num_tokens: int) -> jax.Array:
    """target (B, M, Z) on a square grid -> (B, num_tokens, Z) by bilinear resize (align_corners=False)."""
    b, m, z = target.shape
    if m == num_tokens:
        return target
    side_in, side_out = int(round(m ** 0.5)), int(round(num_tokens ** 0.5))
    if side_in * side_in != m or side_out * side_out != num_tokens:
        raise ValueError(f"REPA token grids must be square: target has {m} tokens, the model {num_tokens}")
    grid = target.reshape(b, side_in, side_in, z)
    grid = jax.image.resize(grid, (b, side_out, side_out, z), method="bilinear", antialias=False)
    return grid.reshape(b, num_tokens, z)


def cosine_loss(pred: jax.Array, target: jax.Array, eps: float = 1e-8) -> jax.Array:
    """(B, N, Z) x (B, N, Z) -> (B,) mean over tokens of 1 - cos(pred, target), in float32 (torch's
    cosine_similarity: x.y / max(|x| |y|, eps))."""
    p, t = pred.astype(jnp.float32), target.astype(jnp.float32)
    dot = jnp.sum(p * t, axis=-1)
    norms = jnp.linalg.norm(p, axis=-1) * jnp.linalg.norm(t, axis=-1)
    return jnp.mean(1.0 - dot / jnp.maximum(norms, eps), axis=-1)


def repa_loss(projector: Projector, h: jax.Array, target: jax.Array) -> jax.Array:
    """Per-example REPA loss; target is stopped (the frozen encoder gets no gradient)."""
    target = jax.lax.stop_gradient(match_token_grid(target, h.shape[1]))
    return cosine_loss(projector(h), target)
