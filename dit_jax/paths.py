"""The paths a command is given, checked before the work starts: the one implementation every command uses.

Inputs: `check_input_file`, `check_input_folder`, `check_input_exists` (it exists, and is of the right kind).
Outputs: `check_output_file`, `check_output_folder` (it is not of the wrong kind and can be written: probed by
creating and removing a temporary file, since permission bits tell root nothing, nor anyone about a read-only file
system). A sampling or conversion run can take hours: a path it could not use fails at once, not at the end.
Writing: `atomic_write` (and `atomic_path`, `write_text_atomic`): a file written through a temporary file beside
it and renamed over it, so that readers see the old file or the whole new one, never half of one.
Hashing: `sha256_file` (checkpoint manifests, the weights cache's records, the converter's input digests).

Every check names the path with what the user typed for it (`flag`: "--out", "OUTPUT_DIR", "image folder", ...)
and says what to do. The problems are PathErrors: OSErrors with the errno and file name of the problem, of the
matching built-in kind (FileNotFoundError, IsADirectoryError, NotADirectoryError), whose str() is the whole
message (dit_jax.errors reports it as it is). An input check takes `error=` where its caller's readers promise
another class (CheckpointReadError, NpzFormatError): the message is the same.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

PROBE_PREFIX = ".dit-jax-write-test-"


class PathError(OSError):
    """A path given to a command cannot serve as it is (missing, of the wrong kind, or not writable)."""

    def __init__(self, code: int, message: str, filename: str | os.PathLike):
        super().__init__(code, message, os.fspath(filename))

    def __str__(self) -> str:
        return self.strerror


class MissingPathError(PathError, FileNotFoundError):
    """Nothing at the path."""


class FolderNotFileError(PathError, IsADirectoryError):
    """A folder where a file is expected."""


class FileNotFolderError(PathError, NotADirectoryError):
    """A file where a folder is expected (the path itself, or a folder on its way)."""


_KINDS: dict[int, type[PathError]] = {
    errno.ENOENT: MissingPathError,
    errno.EISDIR: FolderNotFileError,
    errno.ENOTDIR: FileNotFolderError,
}

ErrorClass = Callable[[str], Exception]


def _subject(path: Path, flag: str | None) -> str:
    return f"{flag} {path}" if flag else str(path)


def _raise(code: int, message: str, path: Path, error: ErrorClass | None = None) -> None:
    if error is not None:
        raise error(message)
    raise _KINDS.get(code, PathError)(code, message, path)


# ----------------------------------------------------------------------------------------------------------
# Inputs: `what` says what the path should be ("a PyTorch checkpoint"), `hint` what to give instead.
# ----------------------------------------------------------------------------------------------------------
def check_input_exists(path: str | os.PathLike, flag: str | None = None, *, hint: str | None = None,
                       error: ErrorClass | None = None) -> Path:
    """`path` (expanded) if something is there; else '<flag> <path>: no such file or folder: check the path'."""
    p = Path(path).expanduser()
    if not p.exists():
        _raise(errno.ENOENT, f"{_subject(p, flag)}: no such file or folder: check the path"
               + (f"; {hint}" if hint else ""), p, error)
    return p


def check_input_file(path: str | os.PathLike, flag: str | None = None, *, what: str = "a file",
                     hint: str | None = None, error: ErrorClass | None = None) -> Path:
    """`path` (expanded) if it is a file (or a device or pipe: anything but a folder); see check_input_exists."""
    return _check_input_kind(path, flag, False, what, hint, error)


def check_input_folder(path: str | os.PathLike, flag: str | None = None, *, what: str = "a folder",
                       hint: str | None = None, error: ErrorClass | None = None) -> Path:
    """`path` (expanded) if it is a folder; see check_input_exists."""
    return _check_input_kind(path, flag, True, what, hint, error)


def _check_input_kind(path: str | os.PathLike, flag: str | None, folder: bool, what: str, hint: str | None,
                      error: ErrorClass | None) -> Path:
    p = check_input_exists(path, flag, hint=hint, error=error)
    if p.is_dir() != folder:
        found, code, advice = ("a file", errno.ENOTDIR, "") if folder else ("a folder", errno.EISDIR, ": name the file")
        _raise(code, f"{_subject(p, flag)} is {found}, where {what} is expected" + (f"; {hint}" if hint else advice),
               p, error)
    return p


# ----------------------------------------------------------------------------------------------------------
# Outputs.
# ----------------------------------------------------------------------------------------------------------
_IN_THE_WAY = "move it or choose another path"


def _check_writable(folder: Path, subject: str, *, create: bool = False, must_exist: bool = False) -> None:
    """`folder` can be written: it (or, when it does not exist yet, its nearest existing ancestor, under which it
    will be created) is a folder where a file can be created. create: make it now; must_exist: it must exist."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        _raise(errno.ENOTDIR, f"{subject}: {existing} is a file, where a folder is expected (a file is in the way: "
               f"{_IN_THE_WAY})", existing)
    if existing != folder and create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            _raise(e.errno or errno.EIO, f"{subject}: cannot create the folder: {_os_reason(e)}", folder)
        existing = folder
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=PROBE_PREFIX)
    except OSError as e:
        _raise(e.errno or errno.EIO, f"{subject}: cannot write in {existing}: {_os_reason(e)}", existing)
    os.close(fd)
    os.unlink(probe)
    if existing != folder and must_exist:
        _raise(errno.ENOENT, f"{subject}: {folder}: no such file or folder: check the path (the folder must exist)",
               folder)


def _os_reason(e: OSError) -> str:
    from dit_jax.errors import os_error_hint

    hint = os_error_hint(e.errno)
    return (e.strerror or type(e).__name__) + (f" ({hint})" if hint else "")


def check_output_file(path: str | os.PathLike, flag: str, *, parent_must_exist: bool = False) -> Path:
    """`path` (expanded) if a file can be written there: it is not a folder, and its folder (created when it is
    written, unless parent_must_exist) can be written. Nothing is created."""
    p = Path(path).expanduser()
    if p.is_dir():
        _raise(errno.EISDIR, f"{_subject(p, flag)} is a folder, where a file is expected (a folder is in the way: "
               f"{_IN_THE_WAY})", p)
    _check_writable(p.parent, _subject(p, flag), must_exist=parent_must_exist)
    return p


def check_output_folder(path: str | os.PathLike, flag: str, *, create: bool = False,
                        renamed: bool = False) -> Path:
    """`path` (expanded) if it is, or can be created as, a folder that can be written. create: create it now
    (otherwise nothing is created). renamed: the folder is written under another name beside it and renamed into
    place (`dit-jax convert`), so the folder that holds it is what must be writable."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        _raise(errno.ENOTDIR, f"{_subject(p, flag)} is a file, where a folder is expected (a file is in the way: "
               f"{_IN_THE_WAY})", p)
    _check_writable(p.parent if renamed else p, _subject(p, flag), create=create and not renamed)
    return p


# ----------------------------------------------------------------------------------------------------------
# Atomic writes: the one implementation of "write a temporary file beside the target, then os.replace".
# ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside `path` for a writer that opens files by name; when the block ends without an error
    whatever was written there is os.replace'd over `path`, and on an error (an interrupt included) it is removed
    and `path` is untouched. The name (".<name>.tmp-<pid>-<random>") starts with "." so that listings and globs of
    the folder (ls, glob.glob; not pathlib's glob) pass over it. Nothing is created here, nor the folder; see
    atomic_write for a file object."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, fsync: bool = False,
                 **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Write `path` through a temporary file in the same folder (see atomic_path), os.replace'd over it when the
    block ends without an error: readers see the old file or the whole new one; on an error the temporary file is
    removed and the target is untouched. mode: "wb" or "w" (with open's other arguments: encoding=...); fsync:
    flush the data to disk before the rename."""
    if "w" not in mode or any(c in mode for c in "ax+"):
        raise ValueError(f"atomic_write writes a new file: mode 'w' or 'wb', not {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode.replace("w", "x"), **open_kwargs) as f:  # "x": never another writer's temporary file
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, text: str, *, fsync: bool = False, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (atomic_write); returns the path."""
    with atomic_write(path, "w", fsync=fsync, encoding=encoding) as f:
        f.write(text)
    return Path(path)


# ----------------------------------------------------------------------------------------------------------
# Hashing: the one sha256 of a file (checkpoint manifests, the weights cache's records, converter input digests).
# ----------------------------------------------------------------------------------------------------------
HASH_CHUNK = 16 << 20  # large reads: checkpoints and weights are GBs (1.9 GB/s measured, BENCHMARKS.md)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in HASH_CHUNK blocks (stdlib only). `path` may also be a path object with its own
    open() (an etils epath: a checkpoint on gs://)."""
    h = hashlib.sha256()
    with (path.open("rb") if hasattr(path, "open") else open(path, "rb")) as f:
        while block := f.read(HASH_CHUNK):
            h.update(block)
    return h.hexdigest()
