"""The `dit-jax` command line: one command table (COMMANDS). Each command lives in the module the table names,
which exposes `register(subparsers, name)`: it adds the parser of command `name` (the table supplies its one-line help) and sets
`func(args) -> int` as the default. Only the command being run is imported.

Errors follow one convention (dit_jax/errors.py): a command raises, and `main` prints one line
`dit-jax COMMAND: error: ...` and exits 1 (2 for usage errors); `--debug` anywhere, or DIT_JAX_DEBUG=1, adds
the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Callable

from dit_jax import errors

# The command table: name -> (the module whose `register(subparsers, name)` defines its parser, the one-line help
# `dit-jax --help` shows), in the order it lists them. A module is imported only when its command runs (or shows
# its --help): `dit-jax --help` imports neither jax nor any command module.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("dit_jax.train.cli", "train a small DiT on the bundled digits (CPU, a few minutes) and sample"),
    "train": ("dit_jax.train.cli", "train (or resume) a DiT from a config file"),
    "extract-latents": ("dit_jax.data.cli", "encode a dataset with the SD VAE into ArrayRecord shards"),
    "convert": ("dit_jax.convert.cli", "convert an official DiT .pt or a diffusers DiT folder to an Orbax checkpoint"),
    "sample": ("dit_jax.sampling.cli", "sample a class-conditional PNG grid from any run, release or DDT"),
    "sample-fid": ("dit_jax.sampling.cli", "sample N images into an ADM-evaluator .npz (resumable)"),
    "sample-ddt": ("dit_jax.sampling.cli", "another name for `sample` (DDT checkpoints, encoder sharing)"),
    "ddt-schedule": ("dit_jax.sampling.cli", "compute and save DDT's DP encoder-sharing schedule"),
    "download": ("dit_jax.weights.cli", "download the official DiT-XL/2 checkpoints and the SD VAE into the cache"),
    "evaluate": ("dit_jax.evaluate.cli",
                 "Inception Score, FID, sFID, precision, recall of a sample .npz (ADM evaluation suite)"),
    "bench": ("dit_jax.perf.cli", "steady-state throughput (train step | guided sampling forward), vs PyTorch"),
    "flops": ("dit_jax.perf.cli", "parameters and forward GFLOPs (MACs, paper convention) of the twelve DiT variants"),
}


class _Subcommands(argparse._SubParsersAction):
    """add_parser takes its help from COMMANDS and always keeps the description's line breaks."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs.setdefault("help", COMMANDS[name][1])
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        return super().add_parser(name, **kwargs)


def _command_in(argv: list[str]) -> str | None:
    """The command word of argv (the first word that is not an option), if it is a known one."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with `command`'s full sub-parser (its module imported); every other command is a placeholder
    that only names itself and its help. command=None: placeholders only (what `dit-jax --help` needs)."""
    parser = argparse.ArgumentParser(
        prog="dit-jax", description="DiT (Peebles & Xie, 2023) in JAX/Flax NNX: models, diffusion, tools.",
        epilog=f"{errors.DEBUG_FLAG} (anywhere) or {errors.DEBUG_ENV}=1: show the traceback of an error.",
    )
    parser.register("action", "parsers", _Subcommands)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, _) in COMMANDS.items():
        if name == command:
            importlib.import_module(module).register(sub, name)
        else:
            sub.add_parser(name)
    return parser


def _quiet_background_tracebacks() -> Callable[[], None]:
    """Exceptions Python can only print (an unraisable one: tensorstore's callbacks into the closed event loop of
    a failed Orbax read) or a background thread's: a one-line warning instead of a traceback (--debug keeps
    Python's printing). The command's own error still ends it as one line."""
    import logging
    import threading

    log = logging.getLogger("dit_jax")

    def unraisable(u: "sys.UnraisableHookArgs") -> None:
        log.debug("ignored in %r: %r", u.object, u.exc_value)

    def thread_failed(a: threading.ExceptHookArgs) -> None:
        if a.exc_type is SystemExit:
            return
        name = a.thread.name if a.thread is not None else "?"
        errors.warn(f"background thread {name}: {errors.message(a.exc_value)}", log)

    saved = sys.unraisablehook, threading.excepthook
    sys.unraisablehook = unraisable
    threading.excepthook = thread_failed

    def restore() -> None:
        sys.unraisablehook, threading.excepthook = saved

    return restore


def main(argv: list[str] | None = None) -> int:
    in_process = argv is not None  # called from Python (tests, notebooks): hand the hooks back afterwards
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    debug = errors.debug_requested(argv[:cut])
    argv = [a for a in argv[:cut] if a != errors.DEBUG_FLAG] + argv[cut:]
    restore = (lambda: None) if debug else _quiet_background_tracebacks()
    try:
        return _main(argv, debug)
    finally:
        if in_process:
            restore()


def _main(argv: list[str], debug: bool) -> int:
    parser = build_parser(_command_in(argv))
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "accepts_overrides", False):
        # `--config.a.b=value` overrides (argparse leaves them in `extra`; a bare word lands in `overrides`)
        words = list(getattr(args, "overrides", []) or []) + extra
        stray = [w for w in words if not w.startswith("--config.")]
        if stray:
            bad = stray[0]
            key = bad.removeprefix("config.")
            hint = f"--config.{key}" if "=" in key and not key.startswith("-") else "--config.KEY=VALUE"
            at = argv.index(bad)
            if at > 0 and argv[at - 1].startswith("--config.") and "=" not in argv[at - 1]:
                hint = f"{argv[at - 1]}={bad}"  # `--config.train.steps 100`
            parser.error(f"unrecognized argument {bad!r}: a config override is written {hint} "
                         f"(one word, with '='; e.g. --config.train.steps=100)")
        args.overrides = words
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return errors.run(f"dit-jax {args.command}", lambda: args.func(args), debug=debug)


if __name__ == "__main__":
    sys.exit(main())
