"""The `dit-jax` command line. Each subcommand lives in its own module, which exposes
`register(subparsers)`: it adds its parser and sets `func(args) -> int` as the default."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand modules, in the order `dit-jax --help` lists them
_SUBCOMMAND_MODULES = (
    "dit_jax.demo",
    "dit_jax.train.cli",
    "dit_jax.extract_latents",
    "dit_jax.convert.cli",
    "dit_jax.sample_cli",
    "dit_jax.sample_ddt_cli",
    "dit_jax.ddt_schedule",
    "dit_jax.weights",
    "dit_jax.evaluate.cli",
    "dit_jax.bench_cli",
    "dit_jax.flops",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dit-jax", description="DiT (Peebles & Xie, 2023) in JAX/Flax NNX: models, diffusion, tools."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `--config.a.b=value` overrides go to subcommands that take them (train); anything else is an error
        if not getattr(args, "accepts_overrides", False) or not all(e.startswith("--config.") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(getattr(args, "overrides", []) or []) + extra
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
