"""Fixed numbers of the papers and of the released weights, importable without jax (config checks, FLOP counts
and the command line read them too). Each has this one owner; every other module imports it from here.

SD VAE (LDM, Rombach et al. 2022; stabilityai/sd-vae-ft-*): 8x spatial downsampling to 4 latent channels, and the
diffusion model sees z * SD_VAE_SCALE (LDM sec. 4.3.2 / D.1; diffusers AutoencoderKL.config.scaling_factor;
DiT's train.py and sample.py); decode expects the unscaled z.

DiT block designs (Peebles & Xie 2023, sec. 3.2, Figure 3): the four ways the block takes its conditioning.

DiT model sizes (Peebles & Xie 2023, Table 1: S, B, L, XL) and patch sizes (2, 4, 8): the twelve configurations.
DiT_models, DDT's sizes (which add their encoder/decoder split), the FLOP table and the config sweeps read them here:
adding a size is one line.
"""

SD_VAE_SCALE = 0.18215
VAE_DOWNSAMPLE = 8
VAE_CHANNELS = 4

BLOCK_TYPES = ("adaLN-Zero", "adaLN", "cross-attn", "in-context")

MODEL_SIZES: dict[str, dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
PATCH_SIZES = (2, 4, 8)
