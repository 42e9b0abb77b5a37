"""Samples -> uint8 images: the SD VAE decoder for latent models, a rescale for pixel-space ones."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dit_jax.constants import SD_VAE_SCALE
from dit_jax.images import to_uint8
from dit_jax.models.vae import AutoencoderKL
from dit_jax.sampling.load import LoadedModel
from dit_jax.sampling.sampler import pad_to_multiple


class Decoder:
    """Latents (n, h, w, 4) -> uint8 images (n, 8h, 8w, 3), batch-sharded, compiled once per padded size.
    As the official sample_ddp.py: vae.decode(z / 0.18215), then clamp(127.5 x + 128, 0, 255) truncated.
    Without a VAE (pixel space): samples in [-1, 1] -> uint8."""

    def __init__(self, vae: AutoencoderKL | None, mesh: jax.sharding.Mesh):
        self.mesh = mesh
        self.sharding = NamedSharding(mesh, P("data"))
        if vae is None:
            self.state = None
            return
        self.graphdef, state = nnx.split(vae)
        self.state = jax.device_put(state, NamedSharding(mesh, P()))
        self._decode = jax.jit(self._decode_impl, out_shardings=self.sharding)

    def _decode_impl(self, state: Any, z: jax.Array) -> jax.Array:
        x = nnx.merge(self.graphdef, state).decode(z / SD_VAE_SCALE)
        return jnp.clip(127.5 * x.astype(jnp.float32) + 128.0, 0, 255).astype(jnp.uint8)

    def __call__(self, samples: jax.Array | np.ndarray) -> np.ndarray:
        if self.state is None:  # pixel space
            return to_uint8(np.asarray(samples))
        n = samples.shape[0]
        (z,) = pad_to_multiple(self.mesh.size, jnp.asarray(samples))
        return np.asarray(self._decode(self.state, jax.device_put(z, self.sharding)))[:n]


def vae_name(loaded: LoadedModel, requested: str | None, default: str) -> str:
    """--vae if given, else the training run's VAE, else the command's default ("none" in pixel space, where
    --vae is an error: nothing would use it)."""
    if loaded.pixel_space:
        if requested:
            raise ValueError(f"{loaded.name} samples pixels (a run trained without a VAE); --vae does not apply: "
                             "drop it")
        return "none"
    return requested or loaded.vae or default


def load_decoder(loaded: LoadedModel, vae: str, mesh: jax.sharding.Mesh, **kw: Any) -> Decoder:
    if loaded.pixel_space:
        return Decoder(None, mesh)
    from dit_jax import weights

    return Decoder(weights.pretrained_vae(vae, **kw), mesh)
