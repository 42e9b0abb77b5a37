"""`dit-jax train --config configs/digits.py[:arg] --workdir DIR [--config.optim.lr=3e-4 ...]`.

The config is a Python file with get_config(arg) (ml_collections, locked: a mistyped override key is an
error); the workdir holds checkpoints, metrics.jsonl, TensorBoard events, sample grids and loss.png. Running
the same command again resumes from the newest complete checkpoint.

Several processes (a TPU pod slice, a GPU cluster, launch/local/multiprocess.sh on one machine) run the same
command; see dit_jax/distributed.py for --coordinator / --num-processes / --process-id and what is detected.
"""

from __future__ import annotations

import argparse
import logging

from dit_jax import distributed


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train (or resume) a DiT from a config file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="config file, optionally with ':arg' (e.g. configs/dit_imagenet.py:variant=XL/2)")
    p.add_argument("--workdir", required=True, help="output folder (local path or gs://...)")
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    distributed.add_arguments(p)
    p.set_defaults(func=run, accepts_overrides=True)


def run(args: argparse.Namespace) -> int:
    from dit_jax.errors import UsageError
    from dit_jax.train.config_io import ConfigError, load_config
    from dit_jax.train.loop import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        distributed.from_args(args)  # before any other JAX call
        config = load_config(args.config, args.overrides)
    except (distributed.DistributedError, ConfigError) as e:  # what was typed: a usage error
        raise UsageError(str(e)) from e
    summary = train(config, args.workdir)
    print(f"{summary['status']} at step {summary['step']}; outputs in {summary['workdir']}")
    return 0
