"""`dit-jax extract-latents`: encode a dataset with the SD VAE into ArrayRecord shards of posterior moments.

    dit-jax extract-latents --vae ema --source tfds --name imagenet2012 --split train \
        --image-size 256 --out /data/imagenet256-latents

--vae ema | mse (the SD VAE, downloaded once into the weights cache, as `dit-jax sample` does) or a local
diffusers VAE folder.

Each image gets the ADM centre crop (as training from pixels would), is encoded to the VAE posterior mean and
log-variance (and, with --flip, so is its mirror image), and written as one record; the trainer samples a fresh
latent 0.18215 * (mean + std * eps) every step (data.source = "latents"). The output is a folder of shards
`latents-00000-of-00128.array_record` (+ `.json` sidecars), each written atomically: an interrupted run is
resumed by running the same command, which skips the finished shards. Unreadable images are skipped and counted.

Several processes (the hosts of a pod, or --coordinator/--num-processes/--process-id, or
launch/local/multiprocess.sh) run the same command as one JAX job and split the shards round-robin (shard s is
process s mod N's); each writes only its own shards and their sidecars, into an --out that every process sees.
The records do not depend on the number of processes: any split writes the same shards as one process.

--store-images also keeps each centre-cropped image (uint8) in its record: REPA (DDT's recipe,
configs/ddt_imagenet.py) aligns to DINOv2 features of the clean image, so training DDT with REPA on latents needs
them. They cost 3 bytes a pixel: ~250 GB more for ImageNet at 256 px.
"""

from __future__ import annotations

import argparse
import logging

from dit_jax import distributed


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    p = subparsers.add_parser(name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True, help="ema | mse (downloaded once into the cache) or a diffusers VAE folder")
    p.add_argument("--source", choices=("tfds", "folder"), required=True)
    p.add_argument("--name", default="imagenet2012", help="TFDS name")
    p.add_argument("--split", default="train")
    p.add_argument("--data-dir", default=None, help="TFDS data_dir")
    p.add_argument("--path", default=None, help="image folder (one sub-folder per class)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-flip", action="store_true", help="do not also encode the mirrored images")
    p.add_argument("--store-images", action="store_true",
                   help="also store each uint8 centre crop (REPA needs the clean images; 3 bytes a pixel)")
    p.add_argument("--num-shards", type=int, default=None, help="default: one per 10,000 images")
    p.add_argument("--out", required=True, help="output folder (shared by every process of a multi-process job)")
    distributed.add_arguments(p)
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    """UsageError for option values no extraction can use (before anything is loaded)."""
    from dit_jax.errors import UsageError

    if args.image_size < 8 or args.image_size % 8:
        raise UsageError(f"--image-size {args.image_size}: expected a positive multiple of 8 (the VAE downsamples "
                         "by 8), e.g. 256")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: expected a positive number of images")
    if args.num_shards is not None and args.num_shards < 1:
        raise UsageError(f"--num-shards {args.num_shards}: expected a positive number (or leave it out: one shard "
                         "per 10,000 images)")
    if args.source == "folder" and not args.path:
        raise UsageError("--source folder needs --path (root/<class>/<image>)")


def run(args: argparse.Namespace) -> int:
    """Carry out `dit-jax extract-latents`; errors are raised (dit_jax.errors: one line, exit 1; 2 for bad
    options)."""
    import jax

    from dit_jax.data.extract import extract
    from dit_jax.data.sources import ImageFolderSource, TfdsSource
    from dit_jax.errors import UsageError
    from dit_jax.paths import check_output_folder
    from dit_jax.weights import pretrained_vae

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_args(args)
    try:
        distributed.from_args(args)  # before any other JAX call
    except distributed.DistributedError as e:  # what was typed: a usage error
        raise UsageError(str(e)) from e
    tag = distributed.process_tag()
    if tag:  # every process's own log lines carry its index
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logging.Formatter(f"{tag}%(levelname)s %(name)s: %(message)s"))
    # the inputs and the output folder, before the VAE is loaded and the first image encoded
    if args.source == "folder":
        source = ImageFolderSource(args.path)
    else:
        source = TfdsSource(args.name, args.split, args.data_dir)
    check_output_folder(args.out, "--out", create=True)
    vae = pretrained_vae(args.vae)
    failed: Exception | None = None
    try:
        stats = extract(
            source, vae, args.out, image_size=args.image_size, batch_size=args.batch_size, flip=not args.no_flip,
            store_images=args.store_images, num_shards=args.num_shards, meta=dict(vae=str(args.vae)),
        )
    except (ValueError, OSError) as e:  # e.g. finished shards written with other options, a full disk
        failed = e
    if failed is None and jax.process_count() > 1:
        print(f"{tag}this process's shards are done: {stats}", flush=True)

    if not distributed.all_agree("dit_jax/extract-latents/done", failed is None):  # the barrier: every shard is written
        if failed is not None:
            raise failed
        raise distributed.DistributedError(f"{tag}another process failed (see its error); rerun the command to "
                                           "resume")
    if jax.process_index() != 0:
        return 0
    print(f"done: {stats if jax.process_count() == 1 else 'every process finished'}; train with "
          f"--config.data.source=latents --config.data.path={args.out}")
    return 0
