"""Flax NNX models: DiT, DDT (and its single-stream "improved DiT" baseline), the SD VAE (AutoencoderKL) and the
FID Inception-v3."""

from dit_jax.models.dit import BLOCK_TYPES, DiT, DiT_models, DiTBlock, FinalLayer, decode_variant
from dit_jax.models.ddt import DDT, DDT_models, ImprovedDiT, ImprovedDiT_models
from dit_jax.models.vae import SD_VAE_SCALE, AutoencoderKL
from dit_jax.models.inception import InceptionV3  # the FID Inception-v3 (dit_jax.evaluate)

__all__ = ["BLOCK_TYPES", "DiT", "DiT_models", "DiTBlock", "FinalLayer", "decode_variant", "AutoencoderKL",
           "SD_VAE_SCALE", "InceptionV3", "DDT", "DDT_models", "ImprovedDiT", "ImprovedDiT_models"]
