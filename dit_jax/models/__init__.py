"""Flax NNX models: DiT (and, later, DDT, the SD VAE and Inception)."""

from dit_jax.models.dit import BLOCK_TYPES, DiT, DiT_models, DiTBlock, FinalLayer, decode_variant
from dit_jax.models.vae import SD_VAE_SCALE, AutoencoderKL

__all__ = ["BLOCK_TYPES", "DiT", "DiT_models", "DiTBlock", "FinalLayer", "decode_variant", "AutoencoderKL",
           "SD_VAE_SCALE"]
