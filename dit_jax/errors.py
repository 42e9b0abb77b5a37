"""One error convention for every `dit-jax` command.

A command that fails prints one line on stderr, `dit-jax COMMAND: error: MESSAGE`, where MESSAGE names the problem
and what to do, and exits with status 1; 2 for usage errors (bad arguments, a bad config argument or override,
as argparse's own errors); 130 for Ctrl-C. No traceback, unless `--debug` (anywhere on the command line) or the
environment variable DIT_JAX_DEBUG=1 asks for one.

Modules raise exceptions; only `dit_jax.cli.main` prints them (through `report`). An error the code anticipates
is an exception whose message is written for the user: one of the project's error classes (ConfigError,
CheckpointError, ...), a ValueError, or an OSError (whose file name and a hint are added here). Anything else is a
bug: it is still one line, with its type and a request to rerun with --debug and report it.

The error classes that more than one part of the project raises live here: UsageError, MissingDependencyError (an
optional package is not installed: `import_optional`), CheckpointMismatchError (a checkpoint's keys or shapes do
not fit what it is loaded into). A path that cannot serve (missing, of the wrong kind, not writable) is a
dit_jax.paths.PathError.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from types import ModuleType
from typing import Callable

DEBUG_ENV = "DIT_JAX_DEBUG"
DEBUG_FLAG = "--debug"


class UsageError(ValueError):
    """The command line asks for something that cannot be done as written (exit status 2)."""


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message says what needs it and how to install it.
    Raised through `import_optional` (or directly where a package is only looked for, not imported)."""

    def __init__(self, package: str, needed_for: str, install: str, detail: str = ""):
        self.package = package
        super().__init__(f"{needed_for} needs {package}, which is not installed"
                         + (f" ({detail})" if detail else "") + f": {install}", name=package)


def import_optional(module: str, needed_for: str, install: str) -> ModuleType:
    """`import module`, or MissingDependencyError saying what needs it (`needed_for`) and how to `install` it.
    The one way to import an optional dependency (torch, ...): a command never catches ImportError itself."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # also raised when sys.modules[module] is None
        raise MissingDependencyError(module.split(".")[0], needed_for, install, str(e)) from e


Shape = Sequence[int]


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit what it is loaded into (a model; a training run's state): every missing,
    unexpected and mis-shaped key at once, the hint first. str() is the full report, a key a line (what --debug
    shows); `summary()` is one line with the first few keys of each kind, which `message` reports.

    what: the kind of checkpoint ("official DiT checkpoint"); where: which one, when that helps ("step 20 in
    runs/x/checkpoints"); target: what it does not fit ("the model"). The keys are listed in the order given."""

    def __init__(
        self,
        missing: Sequence[str],
        unexpected: Sequence[str],
        mismatched: Sequence[tuple[str, Shape, Shape]],  # (key, expected shape, shape in the checkpoint)
        hint: str = "",
        what: str = "checkpoint",
        *,
        where: str = "",
        target: str = "the model",
    ):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = [(k, tuple(e), tuple(g)) for k, e, g in mismatched]
        self.hint = hint
        lines = [
            f"the {what}{f' {where}' if where else ''} does not match {target}: {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.mismatched)} mis-shaped key(s)"
        ]
        if hint:  # first: with hundreds of keys listed, the likely cause should not scroll away
            lines.append(f"hint: {hint}")
        if self.missing:
            lines.append(f"missing from the {what} ({len(self.missing)}):")
            lines += [f"  {k}" for k in self.missing]
        if self.unexpected:
            lines.append(f"unexpected in the {what} ({len(self.unexpected)}):")
            lines += [f"  {k}" for k in self.unexpected]
        if self.mismatched:
            lines.append(f"mis-shaped ({len(self.mismatched)}), expected vs got:")
            lines += [f"  {k}: expected {e}, got {g}" for k, e, g in self.mismatched]
        self.headline = lines[0]
        super().__init__("\n".join(lines))

    def summary(self, max_keys: int = 3) -> str:
        """The report in one line, for a command's error message: the counts, the first `max_keys` keys of each
        kind, the hint, and that --debug lists every key (str(self))."""

        def some(keys: list[str]) -> str:
            more = f", ... ({len(keys) - max_keys} more)" if len(keys) > max_keys else ""
            return ", ".join(keys[:max_keys]) + more

        parts = [self.headline]
        if self.missing:
            parts.append(f"missing e.g. {some(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected e.g. {some(self.unexpected)}")
        if self.mismatched:
            parts.append("mis-shaped e.g. " + some([f"{k} {g} (expected {e})" for k, e, g in self.mismatched]))
        return ("; ".join(parts) + (f". Hint: {self.hint}" if self.hint else "")
                + f" ({DEBUG_FLAG} lists every key)")


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


def os_error_hint(code: int | None) -> str | None:
    """What to do about an OSError of this errno ('check the permissions, ...'), where there is something to say."""
    return _OS_HINTS.get(code or -1)


def os_error_message(e: OSError) -> str:
    """'Permission denied: /x/y (check the permissions, ...)' from an OSError that has a file name."""
    if e.filename is None or e.strerror is None:
        return _collapse(str(e)) or type(e).__name__
    where = str(e.filename) + (f" -> {e.filename2}" if e.filename2 is not None else "")
    hint = os_error_hint(e.errno)
    return f"{e.strerror}: {where}" + (f" ({hint})" if hint else "")


def _anticipated(e: BaseException) -> bool:
    """An exception whose message is meant for the user (as opposed to a bug's)."""
    if isinstance(e, (ValueError, OSError, FloatingPointError)):
        return True
    return type(e).__module__.split(".")[0] == "dit_jax"


def message(e: BaseException) -> str:
    if isinstance(e, OSError) and not type(e).__module__.startswith("dit_jax"):
        return os_error_message(e)
    if isinstance(e, CheckpointMismatchError):  # hundreds of keys: one line here, the full report with --debug
        return e.summary()
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
