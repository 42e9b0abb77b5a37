# pylint: disable=line-too-long
r"""DiT on class-conditional ImageNet in SD-VAE latent space: the paper's recipe (Peebles & Xie 2023, section 4).

  dit-jax train --config configs/dit_imagenet.py:variant=XL/2,res=256 \
      --workdir gs://BUCKET/dit-xl2-256 --config.data.path=gs://BUCKET/imagenet-latents-256 --config.optim.lr=1e-4

Config argument (comma-separated key=value): variant (S|B|L|XL / 2|4|8, default XL/2), res (pixels, 256 or 512;
the model sees res // 8 latents), runlocal (True: tiny model, batch 8, 20 steps on a CPU), source (latents: the
pre-extracted posterior mean/std of sd-vae-ft-ema, as `dit-jax extract-latents` writes them; tfds | folder:
images, which `dit-jax train` does not VAE-encode on the fly yet, so it refuses them: extract latents first).

Paper settings (DiT paper, Sec. 4 "Training"): AdamW lr 1e-4 constant, weight decay 0, no warm-up or clipping, global batch
256, EMA 0.9999 every step from the initial weights, horizontal flips, ADM centre crop, latents
z = 0.18215 * (mean + std * eps) drawn fresh every step, 400K steps, learned sigma (MSE + VB loss), 1000 diffusion
steps with the linear schedule, label dropout 0.1. Compute is bf16 on the matmuls (params and EMA in fp32).
The paper's sweep (S/B/L/XL x 2/4/8, and the four block designs) is configs/sweeps.py.
"""

from __future__ import annotations

import ml_collections

from configs.common import check_choice, check_res, parse_arg, variant_arg
from dit_jax.train.config_schema import apply_runlocal, base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, variant="XL/2", res=256, runlocal=False, source="latents")
    check_res(args["res"], variant_arg(args["variant"])["patch_size"])  # fail early on an unknown variant
    check_choice("source", args["source"], ("latents", "tfds", "folder"))
    config = base_config()
    config.seed = 0

    config.model.variant = args["variant"]
    config.model.input_size = args["res"] // 8  # 32 at 256 px, 64 at 512 px
    config.model.in_channels = 4
    config.model.num_classes = 1000
    config.model.learn_sigma = True
    config.model.class_dropout_prob = 0.1
    config.model.block_type = "adaLN-Zero"
    config.model.dtype = "bfloat16"
    config.model.attn_impl = "xla"
    config.model.scan_blocks = True
    config.model.remat_policy = "none"

    config.diffusion.timestep_respacing = ""
    config.diffusion.noise_schedule = "linear"
    config.diffusion.learn_sigma = True
    config.diffusion.diffusion_steps = 1000

    config.data.source = args["source"]
    config.data.name = "imagenet2012"
    config.data.split = "train"
    config.data.image_size = args["res"]
    config.data.channels = 3
    config.data.num_classes = 1000
    config.data.random_flip = True
    config.data.latent_scale = 0.18215
    config.data.vae = "stabilityai/sd-vae-ft-ema"

    config.optim.lr = 1e-4
    config.optim.weight_decay = 0.0
    config.optim.b1, config.optim.b2, config.optim.eps = 0.9, 0.999, 1e-8
    config.optim.grad_clip_norm = 0.0
    config.optim.warmup_steps = 0
    config.optim.ema_decay = 0.9999

    config.train.global_batch = 256
    config.train.steps = 400_000
    config.train.log_every = 100
    config.train.ckpt_every = 50_000
    config.train.keep_ckpts = 3
    # The trainer draws sample grids of pixel-space runs only (latents need the VAE decoder): sample checkpoints
    # with `dit-jax sample`. train.sample_every > 0 is refused for data.source=latents.
    config.train.sample_every = 0
    config.train.sample_cfg_scale = 4.0  # the paper's visualisation scale (FID uses 1.5)
    config.train.sample_steps = 250
    config.train.sample_per_class = 4
    config.train.sample_num_classes = 8
    config.train.nan_check = True

    config.mesh.data = -1
    config.mesh.fsdp = 1
    config.fsdp = False

    if args["runlocal"]:
        apply_runlocal(config)
    return config
