"""The `dit-jax` command line. Each subcommand lives in its own module, which exposes
`register(subparsers)`: it adds its parser and sets `func(args) -> int` as the default."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand modules, in the order `dit-jax --help` lists them
_SUBCOMMAND_MODULES = (
    "dit_jax.demo",
    "dit_jax.convert.cli",
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
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
