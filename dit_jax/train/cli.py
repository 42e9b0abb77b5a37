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
from typing import Any, Callable

from dit_jax import distributed


# This module holds two commands: `dit-jax train` (run_train) and `dit-jax demo` (run_demo: train configs/digits.py,
# then sample and score; its work is dit_jax/train/demo.py).
DEMO_CONFIG = "configs/digits.py"


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    """Add command `name`: "train" (handler run_train) or "demo" (handler run_demo)."""
    if name == "demo":
        _register_demo(subparsers, name)
        return
    if name != "train":
        raise ValueError(f"dit_jax.train.cli defines the commands train and demo, not {name!r}")
    p = subparsers.add_parser(
        name,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file, optionally with ':arg' (e.g. configs/dit_imagenet.py:variant=XL/2)")
    p.add_argument("--workdir", required=True, help="output folder (local path or gs://...)")
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    distributed.add_arguments(p)
    p.set_defaults(func=run_train, accepts_overrides=True)


def _register_demo(subparsers: argparse._SubParsersAction, name: str) -> None:
    p = subparsers.add_parser(name)
    p.add_argument("--workdir", default="runs/digits", help="output folder (default: runs/digits)")
    p.add_argument("--config", default=DEMO_CONFIG, help=f"config file (default: {DEMO_CONFIG})")
    p.add_argument("--per-class", type=int, default=20, help="samples per class (default 20)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    p.set_defaults(func=run_demo, accepts_overrides=True)


# what the trainer writes in a workdir: name -> is a folder
WORKDIR_LAYOUT = {"checkpoints": True, "tb": True, "samples": True, "metrics.jsonl": False, "loss.png": False}


def check_workdir(workdir: str, flag: str = "--workdir", *, create: bool = True) -> None:
    """A local output folder that can be written (created now unless create=False), and nothing in it where the
    trainer writes (WORKDIR_LAYOUT); any problem is an error naming `flag` (exit status 1, as every command's
    unwritable output: the place, not the command line, is wrong), before any work. gs://... is left to the
    trainer."""
    from dit_jax.paths import check_output_folder

    if "://" in workdir:
        return
    path = check_output_folder(workdir, flag, create=create)
    for name, folder in WORKDIR_LAYOUT.items():  # what a rerun would otherwise trip on, minutes in
        inside = path / name
        if inside.exists() and inside.is_dir() != folder:
            kind, want = ("a file", "folder") if folder else ("a folder", "file")
            raise FileExistsError(f"{flag} {workdir}: {inside} is {kind}, where the trainer writes its {name} "
                                  f"{want}: move it, or choose another workdir")


def load_run_config(spec: str, overrides: list[str], workdir: str,
                    check: Callable[[Any], None] | None = None) -> Any:
    """load_config + what a starting run checks (the job's devices, `check(config)` if given, then the workdir,
    which is created); any problem with what was typed is a UsageError (exit status 2). Call after
    `distributed.from_args` (it counts the job's devices)."""
    import jax

    from dit_jax.errors import UsageError
    from dit_jax.train.config_load import load_config
    from dit_jax.train.config_schema import ConfigError, check_run

    try:
        config = load_config(spec, overrides)
        check_run(config, jax.device_count())
    except ConfigError as e:  # what was typed: a usage error
        raise UsageError(str(e)) from e
    if check is not None:
        check(config)
    check_workdir(workdir, create=jax.process_index() == 0)  # process 0 writes the run
    return config


def run_train(args: argparse.Namespace) -> int:
    """Carry out `dit-jax train`; errors are raised (dit_jax.errors: one line, exit 1; 2 for bad usage)."""
    from dit_jax.errors import UsageError
    from dit_jax.train.loop import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        distributed.from_args(args)  # before any other JAX call
    except distributed.DistributedError as e:  # what was typed: a usage error
        raise UsageError(str(e)) from e
    config = load_run_config(args.config, args.overrides, args.workdir)
    summary = train(config, args.workdir)
    print(f"{summary['status']} at step {summary['step']}; outputs in {summary['workdir']}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """Carry out `dit-jax demo` (dit_jax/train/demo.py); errors are raised (dit_jax.errors: one line, exit 1; 2
    for bad usage)."""
    import time

    from dit_jax.errors import UsageError
    from dit_jax.train.demo import check_demo_config, run_demo as demo

    t_start = time.perf_counter()
    overrides = list(args.overrides or [])
    if args.per_class < 1:
        raise UsageError(f"--per-class {args.per_class}: must be >= 1 (samples per class)")
    for key in ("train.sample_per_class", "train.sample_num_classes"):
        if any(o.split("=", 1)[0] == f"--config.{key}" for o in overrides):
            raise UsageError(f"--config.{key} does not apply to the demo, which samples every class: use --per-class")
    config = load_run_config(args.config, overrides, args.workdir, check=lambda c: check_demo_config(c, args.config))
    demo(config, args.workdir, per_class=args.per_class, seed=args.seed, t_start=t_start)
    return 0
