# pylint: disable=line-too-long
r"""DDT on class-conditional ImageNet in SD-VAE latent space: the paper's recipe (Wang et al. 2025; MCG-NJU/DDT
configs/repa_improved_ddt_xlen22de6_256.yaml).

  dit-jax extract-latents --vae path/to/sd-vae-ft-ema --source tfds --name imagenet2012 --split train \
      --image-size 256 --store-images --out /data/imagenet256-latents-images
  dit-jax train --config configs/ddt_imagenet.py:variant=XL/2,res=256 \
      --workdir gs://BUCKET/ddt-xl2-256 --config.data.path=/data/imagenet256-latents-images \
      --config.repa.encoder_path=/data/dinov2_vitb14_pretrain.pth

Config argument (comma-separated key=value): variant (S|B|L|XL / 2; the encoder/decoder split is the paper's:
XL 22En6De, L 20En4De, B 8En4De, S 8En4De), res (256 or 512), runlocal (True: tiny model, batch 8, 20 steps on a
CPU, a frozen random ViT in place of DINOv2), repa (False: train without REPA, on latents with no stored images).

Paper settings: flow matching on the linear path (x_t = t x + (1 - t) eps, v = x - eps), t = sigmoid(N(0, 1)),
AdamW lr 1e-4, betas (0.9, 0.95), weight decay 0, EMA 0.9999, global batch 256, label dropout 0.1, bf16 matmuls;
REPA: encoder block 8 aligned through a D -> D -> D -> 768 SiLU MLP to DINOv2 ViT-B/14 patch features of the clean
image, weight 0.5. The images come from the latent shards (`extract-latents --store-images`), mirrored together
with the latents; the DINOv2 weights from a local file (the official dinov2_vitb14_pretrain.pth; nothing is
downloaded). Sampling for the headline FID: Euler, 250 steps on linspace(0, 0.96, 250) + [1], CFG 2.0 (3.0 at
512 px) only where 0.3 < t < 1 (dit_jax.sampling.SampleSettings(sampler="euler", ...) and Sampler, with
encoder sharing: `dit-jax sample-fid --ckpt RUN --schedule ...`).
"""

from __future__ import annotations

import ml_collections

from configs.common import check_res, parse_arg, variant_arg
from dit_jax.models.ddt import decode_ddt_variant
from dit_jax.train.config_schema import apply_runlocal, base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, variant="XL/2", res=256, runlocal=False, repa=True)
    check_res(args["res"], variant_arg(args["variant"], decode_ddt_variant)["patch_size"])
    config = base_config()
    config.seed = 0
    config.objective = "flow"

    config.model.arch = "ddt"
    config.model.variant = args["variant"]
    config.model.input_size = args["res"] // 8
    config.model.in_channels = 4
    config.model.num_classes = 1000
    config.model.learn_sigma = False  # a velocity model
    config.model.class_dropout_prob = 0.1
    config.model.dtype = "bfloat16"
    config.model.attn_impl = "xla"

    config.flow.t_dist = "logit_normal"
    config.flow.time_scale = 1.0

    config.repa.weight = 0.5 if args["repa"] else 0.0
    config.repa.layer = 8
    config.repa.encoder = "dinov2_vitb14"
    config.repa.proj_dim = 768
    config.repa.proj_hidden = 0  # = the model width, as the reference (proj_hidden_dim = hidden_dim)

    config.data.source = "latents"
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
    config.optim.b1, config.optim.b2, config.optim.eps = 0.9, 0.95, 1e-8
    config.optim.grad_clip_norm = 0.0
    config.optim.warmup_steps = 0
    config.optim.ema_decay = 0.9999

    config.train.global_batch = 256
    config.train.steps = 4_000_000  # the reference's max_steps; the paper reports 256 and 400 epochs
    config.train.log_every = 100
    config.train.ckpt_every = 10_000
    config.train.keep_ckpts = 3
    config.train.sample_every = 0  # the trainer draws grids of pixel-space runs only: sample with `dit-jax sample`
    config.train.nan_check = True

    config.mesh.data = -1
    config.mesh.fsdp = 1
    config.fsdp = False

    if args["runlocal"]:
        apply_runlocal(config)
    return config
