"""Class-conditional sampling with classifier-free guidance, as the official sample.py does it.

The batch is [noise for the n labels | the same noise with the null label]; the model runs as
`forward_with_cfg`; the second half is dropped at the end. DiT samples with clip_denoised=False.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.diffusion import create_diffusion
from dit_jax.models import DiT

SAMPLERS = ("ddpm", "ddim")


def sample_latents(
    model: DiT,
    labels: Any,
    *,
    key: jax.Array,
    num_steps: int = 250,
    cfg_scale: float = 4.0,
    cfg_channels: int | None = 3,
    sampler: str = "ddpm",
    clip_denoised: bool = False,
    progress: bool = False,
) -> np.ndarray:
    """labels (n,) int -> samples (n, H, W, C) float32 in the model's input space (latents, or pixels).

    num_steps respaces the 1000-step process ("250" for DDPM, "ddim<num_steps>" for DDIM).
    cfg_scale 1.0 disables guidance (one forward per step on n examples instead of 2n).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    labels = jnp.asarray(np.asarray(labels), jnp.int32)
    n = labels.shape[0]
    diffusion = create_diffusion(f"ddim{num_steps}" if sampler == "ddim" else str(num_steps))
    shape = (n, model.input_size, model.input_size, model.in_channels)
    graphdef, state = nnx.split(model)
    use_cfg = cfg_scale != 1.0

    def run(state, key: jax.Array) -> jax.Array:
        m = nnx.merge(graphdef, state)
        k_noise, k_loop = jax.random.split(key)
        z = jax.random.normal(k_noise, shape, jnp.float32)
        if use_cfg:
            z = jnp.concatenate([z, z], axis=0)
            y = jnp.concatenate([labels, jnp.full((n,), m.num_classes, jnp.int32)])

            def model_fn(x, t, y):
                return m.forward_with_cfg(x, t, y, cfg_scale, cfg_channels)

        else:
            y = labels

            def model_fn(x, t, y):
                return m(x, t, y)

        loop = diffusion.ddim_sample_loop if sampler == "ddim" else diffusion.p_sample_loop
        out = loop(model_fn, z.shape, noise=z, clip_denoised=clip_denoised, model_kwargs=dict(y=y), key=k_loop)
        return out[:n]

    return np.asarray(jax.jit(run)(state, key))
