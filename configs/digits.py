r"""The embedded demo: a small class-conditional DiT trained in pixel space on scikit-learn's bundled digits.

  dit-jax train --config configs/digits.py --workdir runs/digits

1,797 handwritten digits (8x8, upsampled to 16x16x1, scaled to [-1, 1]), 10 classes; no download. Runs on a CPU.
Config argument: runlocal (True: depth 2, width 64, batch 8, 20 steps), e.g. configs/digits.py:runlocal=True.

Not the paper's recipe, because it must finish in a few minutes on a 2-core CPU: the model is a small DiT
(depth 4, width 128, 4 heads, patch 4 -> 16 tokens, 1.3M params) trained for 3,000 steps of batch 32 (about
14 steps/s on 2 cores), so the learning rate is higher (2e-3 with a 100-step warm-up and clipping at 1.0) and
the EMA shorter (0.99) than ImageNet's 1e-4 / 0.9999. The diffusion is the paper's (1000 linear steps, learned
sigma, hybrid loss); samples use DPM-Solver++ in 25 steps and CFG 4.0. Every 500 steps the trainer scores 500 EMA
samples (train.eval_every: the digits Frechet distance and classifier accuracy, dit_jax/evaluate/digits_classifier.py)
into metrics.jsonl, TensorBoard and the quality panel of loss.png.
"""

from __future__ import annotations

import ml_collections

from configs.common import parse_arg
from dit_jax.train.config_schema import apply_runlocal, base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, runlocal=False)
    config = base_config()
    config.seed = 0

    # The variant names the family; the explicit sizes below replace its depth / width / heads / patch.
    config.model.variant = "S/2"
    config.model.depth = 4
    config.model.hidden_size = 128
    config.model.num_heads = 4
    config.model.patch_size = 4
    config.model.input_size = 16  # pixel space
    config.model.in_channels = 1
    config.model.num_classes = 10
    config.model.learn_sigma = True
    config.model.class_dropout_prob = 0.1
    config.model.block_type = "adaLN-Zero"
    config.model.dtype = "float32"
    config.model.attn_impl = "xla"
    config.model.scan_blocks = False
    config.model.remat_policy = "none"

    config.diffusion.timestep_respacing = ""
    config.diffusion.noise_schedule = "linear"
    config.diffusion.learn_sigma = True
    config.diffusion.diffusion_steps = 1000

    config.data.source = "digits"
    config.data.name = "digits"
    config.data.split = "train"
    config.data.image_size = 16
    config.data.channels = 1
    config.data.num_classes = 10
    config.data.random_flip = False  # a flipped digit is another glyph
    config.data.num_workers = 0
    config.data.vae = ""  # pixel space: no VAE

    config.optim.lr = 2e-3  # not the paper's 1e-4: a small model and a short run
    config.optim.weight_decay = 0.0
    config.optim.b1, config.optim.b2, config.optim.eps = 0.9, 0.999, 1e-8
    config.optim.grad_clip_norm = 1.0
    config.optim.warmup_steps = 100
    config.optim.ema_decay = 0.99  # averages over ~100 steps of a 3K-step run

    config.train.global_batch = 32
    config.train.steps = 3000
    config.train.log_every = 100
    config.train.ckpt_every = 1000
    config.train.keep_ckpts = 3
    config.train.sample_every = 0  # the demo samples the EMA model once, after training
    config.train.sample_sampler = "dpmsolver++"  # 25 steps score as 250 DDPM steps do here (BENCHMARKS.md)
    config.train.sample_cfg_scale = 4.0
    config.train.sample_steps = 25
    config.train.sample_per_class = 20
    config.train.sample_num_classes = 10
    config.train.eval_every = 500  # the digits FD and accuracy of 500 EMA samples, six times a run
    config.train.eval_num_samples = 500
    config.train.eval_reference = ""  # the digits FD (no Inception)
    config.train.eval_inception = ""
    config.train.nan_check = True

    config.mesh.data = -1
    config.mesh.fsdp = 1
    config.fsdp = False

    if args["runlocal"]:
        apply_runlocal(config)
    return config
