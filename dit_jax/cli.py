"""The `dit-jax` command line. Each subcommand lives in its own module, which exposes
`register(subparsers)`: it adds its parser and sets `func(args) -> int` as the default.

Errors follow one convention (dit_jax/errors.py): a command raises, and `main` prints one line
`dit-jax COMMAND: error: ...` and exits 1 (2 for usage errors); `--debug` anywhere, or DIT_JAX_DEBUG=1, adds
the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

from dit_jax import errors

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
        prog="dit-jax", description="DiT (Peebles & Xie, 2023) in JAX/Flax NNX: models, diffusion, tools.",
        epilog=f"{errors.DEBUG_FLAG} (anywhere) or {errors.DEBUG_ENV}=1: show the traceback of an error.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
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
    parser = build_parser()
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
