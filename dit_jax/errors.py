"""One error convention for every `dit-jax` command.

A command that fails prints one line on stderr, `dit-jax COMMAND: error: MESSAGE`, where MESSAGE names the problem
and what to do, and exits with status 1; 2 for usage errors (bad arguments, a bad config argument or override,
as argparse's own errors); 130 for Ctrl-C. No traceback, unless `--debug` (anywhere on the command line) or the
environment variable DIT_JAX_DEBUG=1 asks for one.

Modules raise exceptions; only `dit_jax.cli.main` prints them (through `report`). An error the code anticipates
is an exception whose message is written for the user: one of the project's error classes (ConfigError,
CheckpointError, ...), a ValueError, or an OSError (whose file name and a hint are added here). Anything else is a
bug: it is still one line, with its type and a request to rerun with --debug and report it.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback
from typing import Callable

DEBUG_ENV = "DIT_JAX_DEBUG"
DEBUG_FLAG = "--debug"


class UsageError(ValueError):
    """The command line asks for something that cannot be done as written (exit status 2)."""


_OS_HINTS = {
    errno.EACCES: "check the permissions, or choose another location",
    errno.EPERM: "check the permissions, or choose another location",
    errno.EROFS: "the file system is read-only: choose another location",
    errno.ENOSPC: "the disk is full: free some space or choose another location",
    errno.EDQUOT: "the disk quota is exhausted: free some space or choose another location",
    errno.EEXIST: "a file is in the way: move it or choose another path",
    errno.ENOTDIR: "a file is where a folder is expected: choose another path",
    errno.EISDIR: "a folder is where a file is expected: name the file",
    errno.ENOENT: "check the path",
}


def warn(message: str, logger: logging.Logger | None = None) -> None:
    """A warning the user must see (a skipped checkpoint, a lock taken over): logged, and on stderr."""
    (logger or logging.getLogger("dit_jax")).warning(message)
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def debug_requested(argv: list[str] | None = None) -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on") or (
        argv is not None and DEBUG_FLAG in argv
    )


def _collapse(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def os_error_message(e: OSError) -> str:
    """'Permission denied: /x/y (check the permissions, ...)' from an OSError that has a file name."""
    if e.filename is None or e.strerror is None:
        return _collapse(str(e)) or type(e).__name__
    where = str(e.filename) + (f" -> {e.filename2}" if e.filename2 is not None else "")
    hint = _OS_HINTS.get(e.errno or -1)
    return f"{e.strerror}: {where}" + (f" ({hint})" if hint else "")


def _anticipated(e: BaseException) -> bool:
    """An exception whose message is meant for the user (as opposed to a bug's)."""
    if isinstance(e, (ValueError, OSError, FloatingPointError)):
        return True
    return type(e).__module__.split(".")[0] == "dit_jax"


def message(e: BaseException) -> str:
    if isinstance(e, OSError) and not type(e).__module__.startswith("dit_jax"):
        return os_error_message(e)
    text = _collapse(str(e))
    if _anticipated(e) and text:
        return text
    return (f"{type(e).__name__}" + (f": {text}" if text else "")
            + f" (unexpected: rerun with {DEBUG_FLAG} or {DEBUG_ENV}=1 for the traceback, and report it)")


def exit_status(e: BaseException) -> int:
    if isinstance(e, KeyboardInterrupt):
        return 130
    if isinstance(e, SystemExit):
        return e.code if isinstance(e.code, int) else 1
    return 2 if isinstance(e, UsageError) else 1


def report(prog: str, e: BaseException, *, debug: bool = False) -> int:
    """Print the one-line error (and, with debug, the traceback first) and return the exit status."""
    if debug:
        traceback.print_exception(e, file=sys.stderr)
    text = "interrupted" if isinstance(e, KeyboardInterrupt) else message(e)
    print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
    return exit_status(e)


def run(prog: str, func: Callable[[], int | None], *, debug: bool = False) -> int:
    """func() -> its exit status (None = 0); an exception -> `report`."""
    try:
        return int(func() or 0)
    except SystemExit as e:  # argparse inside a command, or sys.exit(message)
        if isinstance(e.code, str):
            print(e.code if e.code.startswith(prog) else f"{prog}: error: {e.code}", file=sys.stderr)
            return 1
        return exit_status(e)
    except BaseException as e:  # noqa: BLE001  (the one place that turns exceptions into the user's message)
        return report(prog, e, debug=debug)
