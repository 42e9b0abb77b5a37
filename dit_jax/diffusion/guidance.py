"""Classifier-free guidance's batch, in the one order every sampler uses (DiT's DDPM/DDIM, flow's Euler/Heun/
Euler-Maruyama, DDT's encoder sharing).

The official DiT batches [x | x] with labels [y | null] (sample.py, forward_with_cfg) and DDT [x | x] with
[null | y] (MCG-NJU/DDT's cfg sampler). We put each example's two passes side by side instead:

    x  [x0, x0, x1, x1, ...]      labels [y0, null, y1, null, ...]

The model calls and the arithmetic are the same, so the samples are too; but a batch sharded over devices keeps
each example's pair on one device, and no step moves data between them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def paired(a: jax.Array) -> jax.Array:
    """(n, ...) -> (2n, ...): every example twice, side by side (its conditional and unconditional pass)."""
    return jnp.repeat(a, 2, axis=0)


def paired_labels(labels: jax.Array, null_class: int) -> jax.Array:
    """(n,) -> (2n,): [y0, null, y1, null, ...]."""
    y = labels.astype(jnp.int32)
    return jnp.stack([y, jnp.full_like(y, null_class)], axis=1).reshape(2 * y.shape[0])


def unpair(out: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A paired batch's output (2n, ...) -> (cond (n, ...), uncond (n, ...))."""
    pairs = out.reshape((out.shape[0] // 2, 2) + out.shape[1:])
    return pairs[:, 0], pairs[:, 1]


def combine(cond: jax.Array, uncond: jax.Array, scale: jax.Array | float) -> jax.Array:
    """uncond + scale (cond - uncond) (Ho & Salimans 2022)."""
    return uncond + scale * (cond - uncond)
