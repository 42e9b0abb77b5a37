"""Fixed numbers of the papers and of the released weights, importable without jax (config checks, FLOP counts
and the command line read them too). Each has this one owner; every other module imports it from here.

SD VAE (LDM, Rombach et al. 2022; stabilityai/sd-vae-ft-*): 8x spatial downsampling to 4 latent channels, and the
diffusion model sees z * SD_VAE_SCALE (LDM sec. 4.3.2 / D.1; diffusers AutoencoderKL.config.scaling_factor;
DiT's train.py and sample.py); decode expects the unscaled z.

DiT block designs (Peebles & Xie 2023, sec. 3.2, Figure 3): the four ways the block takes its conditioning.
"""

SD_VAE_SCALE = 0.18215
VAE_DOWNSAMPLE = 8
VAE_CHANNELS = 4

BLOCK_TYPES = ("adaLN-Zero", "adaLN", "cross-attn", "in-context")
