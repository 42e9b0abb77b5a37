"""Fetch one file over HTTP(S) into the cache, safely: `<file>.part`, resume with Range, size and sha256 checks,
then an atomic rename. stdlib only (urllib); tqdm for the progress bar.

`fetch(url, dest, ...)` is the whole procedure; `verify_cached(dest, ...)` checks a file already in place. Next to
each verified file a `<file>.sha256` record ("<hex>  <file>", as `sha256sum` writes) keeps the digest that every
later use is checked against. A hidden `.<file>.lock` (fcntl) serialises processes writing the same file.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

from dit_jax.paths import sha256_file, write_text_atomic

log = logging.getLogger("dit_jax.weights")

# Tunables, read at call time (tests and callers may change them): seconds per socket operation, retries after
# the first attempt for transient failures (connection errors, timeouts, 5xx/429, a transfer cut short), and the
# first backoff in seconds (doubled after each retry).
TIMEOUT_S = float(os.environ.get("DIT_JAX_DOWNLOAD_TIMEOUT", "60"))
RETRIES = int(os.environ.get("DIT_JAX_DOWNLOAD_RETRIES", "3"))
BACKOFF_S = 1.0
CHUNK = 1 << 20
USER_AGENT = "dit-jax (urllib)"
_TRANSIENT_HTTP = (408, 425, 429, 500, 502, 503, 504)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# ----------------------------------------------------------------------------------------------------------
# Errors. All are OSErrors, so callers handling I/O failures handle these too.
# ----------------------------------------------------------------------------------------------------------
class WeightsError(OSError):
    """A download or cache problem; the message says what happened and what to do."""


class DownloadError(WeightsError):
    """The server could not be reached or refused the request."""


class IncompleteDownloadError(DownloadError):
    """The transfer stopped before the announced size (after all retries); the .part file is kept for resuming."""


class ChecksumMismatchError(WeightsError):
    """The downloaded bytes have the wrong size or sha256; nothing was kept."""


class CorruptCacheError(WeightsError):
    """A file in the cache no longer matches the size or sha256 it was verified with."""


class OfflineError(WeightsError):
    """Offline mode and the file is not in the cache."""


class _Transient(Exception):
    """A failure worth retrying (internal)."""


# ----------------------------------------------------------------------------------------------------------
# Small helpers.
# ----------------------------------------------------------------------------------------------------------
def part_path(dest: Path) -> Path:
    """The partial download next to dest."""
    return dest.with_name(dest.name + ".part")


def record_path(dest: Path) -> Path:
    """The sha256 record next to dest."""
    return dest.with_name(dest.name + ".sha256")


def read_record(dest: Path) -> str | None:
    """The sha256 recorded for dest, or None when there is no readable record."""
    try:
        text = record_path(dest).read_text().split()
    except OSError:
        return None
    return text[0].lower() if text and _HEX64.match(text[0].lower()) else None


def write_record(dest: Path, digest: str) -> None:
    """Write `<dest>.sha256` atomically, in sha256sum format."""
    write_text_atomic(record_path(dest), f"{digest}  {dest.name}\n")


_READ_ONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on `path` (created if needed). No-op where fcntl is missing (Windows) and
    where the lock file cannot be created for lack of permission (a read-only cache, which only readers use)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+b")
    except OSError as e:
        if e.errno not in _READ_ONLY_ERRNOS:
            raise
        # A cache we may not write to (read-only, shared): nothing can be written, so there is nothing to
        # serialise; a reader goes on, and a writer fails on its first write, naming the path.
        log.debug("%s: cannot create the lock file (%s); going on without it", path, e.strerror)
        f = None
    if f is None:
        yield
        return
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def lock_path(dest: Path) -> Path:
    """The lock file guarding dest."""
    return dest.with_name(f".{dest.name}.lock")


def _hex_tag(value: str | None) -> str | None:
    """A 64-hex-digit sha256 from an ETag-like header value ('W/"abc…"' -> 'abc…'), or None."""
    if not value:
        return None
    v = value.strip()
    v = v[2:] if v.startswith("W/") else v
    v = v.strip('"').lower()
    return v if _HEX64.match(v) else None


def _int_header(headers: Message | None, name: str) -> int | None:
    try:
        return int(headers[name]) if headers is not None and headers[name] is not None else None
    except ValueError:
        return None


def _content_range_total(headers: Message | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a Content-Range header "bytes a-b/total" or "bytes */total"."""
    value = headers["Content-Range"] if headers is not None else None
    m = re.match(r"^\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*$", value or "")
    if not m:
        return None, None
    first = int(m.group(1)) if m.group(1) is not None else None
    return first, (int(m.group(2)) if m.group(2) != "*" else None)


def _fmt_size(n: int | None) -> str:
    return "unknown size" if n is None else f"{n:,} bytes"


# ----------------------------------------------------------------------------------------------------------
# The cache side.
# ----------------------------------------------------------------------------------------------------------
def verify_cached(dest: Path, url: str, *, size: int | None = None, sha256: str | None = None, fix: str = "") -> Path:
    """Check a cached file against the pinned size/sha256, else against its `.sha256` record.

    A file without a record and without a pinned sha256 (placed by hand, e.g. for offline use) is accepted and
    its digest recorded, so later changes are caught. CorruptCacheError (naming the file and the fix) otherwise.
    """
    how_to_fix = f"delete it (rm '{dest}'){' or run `' + fix + '`' if fix else ''} to fetch it again from {url}"
    if dest.is_dir():
        raise CorruptCacheError(f"{dest}: a folder, where the cache keeps a downloaded file: delete it (rm -r "
                                f"'{dest}') to fetch the file again from {url}")
    actual = dest.stat().st_size
    if size is not None and actual != size:
        raise CorruptCacheError(
            f"{dest}: {_fmt_size(actual)}, expected {_fmt_size(size)}: the cached file is corrupt; {how_to_fix}"
        )
    recorded = read_record(dest)
    want = (sha256 or "").lower() or recorded
    digest = sha256_file(dest)
    if want is None:
        log.info("%s: no sha256 record; recording %s (it is checked on every later use)", dest, digest)
        _try_write_record(dest, digest)
        return dest
    if digest != want:
        origin = "pinned in the registry" if sha256 else f"recorded when it was verified ({record_path(dest).name})"
        raise CorruptCacheError(
            f"{dest}: sha256 {digest} does not match the sha256 {origin}, {want}: the cached file is corrupt or was "
            f"replaced; {how_to_fix}"
        )
    if recorded != digest:
        _try_write_record(dest, digest)
    return dest


def _try_write_record(dest: Path, digest: str) -> None:
    """write_record, except in a cache that cannot be written (read-only, shared): a reader must not fail there,
    so the file is used unrecorded (and checked against the record again next time, when there is one)."""
    try:
        write_record(dest, digest)
    except OSError as e:
        if e.errno not in _READ_ONLY_ERRNOS:
            raise
        log.warning("%s: cannot record its sha256 in %s (%s); using the file unrecorded", dest,
                    record_path(dest), e.strerror)


def offline_error(missing: list[tuple[Path, str]], what: str) -> OfflineError:
    """The error for files missing in offline mode: where each must go and where it comes from."""
    lines = [f"offline mode (--offline, DIT_JAX_OFFLINE=1 or HF_HUB_OFFLINE=1) and {what} is not in the cache."]
    lines += [f"  missing {dest}\n    fetch it on a machine with internet access from {url}" for dest, url in missing]
    lines.append("Copy the file(s) to exactly those paths, or turn offline mode off to download them.")
    return OfflineError("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------
# The network side.
# ----------------------------------------------------------------------------------------------------------
class _FirstHopHeaders(urllib.request.HTTPRedirectHandler):
    """Follows redirects like urllib's default handler, keeping the headers of the first response: Hugging Face
    sends X-Linked-Etag / X-Linked-Size (sha256 and size of an LFS file) on its redirect to the CDN."""

    def __init__(self) -> None:
        super().__init__()
        self.first: Message | None = None

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        if self.first is None:
            self.first = headers
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Expected:
    """What the finished file must be: size and sha256, with where each came from (for the error messages)."""

    def __init__(self, size: int | None, sha256: str | None) -> None:
        self.size, self.size_from = size, "pinned in the registry" if size is not None else ""
        self.sha256, self.sha_from = (sha256.lower() if sha256 else None), "pinned in the registry" if sha256 else ""

    def learn(self, headers: Message | None, announced: int | None, etag_is_sha256: bool, url: str) -> None:
        """Take size and sha256 from the first server's headers where nothing is pinned; a header that contradicts
        a pinned value is a ChecksumMismatchError before any byte is written."""
        linked_size = _int_header(headers, "X-Linked-Size")
        linked_sha = _hex_tag(headers["X-Linked-Etag"] if headers is not None else None)
        if linked_sha is None and etag_is_sha256:
            linked_sha = _hex_tag(headers["ETag"] if headers is not None else None)
        for got, what in ((linked_size, "X-Linked-Size"), (announced, "Content-Length")):
            if got is None:
                continue
            if self.size is None:
                self.size, self.size_from = got, f"the server's {what}"
            elif got != self.size:
                raise ChecksumMismatchError(
                    f"{url}: the server announces {_fmt_size(got)} ({what}) but {self.size_from} says "
                    f"{_fmt_size(self.size)}: refusing to download a different file"
                )
        if linked_sha is not None:
            if self.sha256 is None:
                self.sha256, self.sha_from = linked_sha, "the server's ETag (Hugging Face LFS sha256)"
            elif linked_sha != self.sha256:
                raise ChecksumMismatchError(
                    f"{url}: the server announces sha256 {linked_sha} but {self.sha_from} says {self.sha256}: "
                    "refusing to download a different file"
                )


def _open(url: str, offset: int, timeout: float) -> tuple[http.client.HTTPResponse | None, Message, Message]:
    """GET url (from byte `offset` when > 0), following redirects. Returns (the response, or None for a 416
    answer to a Range request (nothing at or past `offset`); the first server's headers; the last server's
    headers). Raises _Transient (worth retrying) or DownloadError."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    redirects = _FirstHopHeaders()
    opener = urllib.request.build_opener(redirects)
    try:
        resp = opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        first = redirects.first or e.headers
        e.close()
        if e.code == 416 and offset:
            return None, first, e.headers
        if e.code in _TRANSIENT_HTTP:
            raise _Transient(f"HTTP {e.code} {e.reason}") from e
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", e)
        raise _Transient(f"cannot reach the server ({reason})") from e
    return resp, redirects.first or resp.headers, resp.headers


def _progress_bar(total: int | None, initial: int, desc: str, progress: bool):
    """A tqdm byte counter on stderr, shown only when asked for and stderr is a terminal."""
    from tqdm import tqdm

    enabled = progress and sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not enabled,
        leave=False,
    )


def _transfer(
    url: str, part: Path, expected: _Expected, *, etag_is_sha256: bool, timeout: float, progress: bool
) -> None:
    """One attempt: append the missing bytes to `part` (resuming when it exists). Returns when `part` holds the
    announced size (or everything the server sent, when no size is known). Raises _Transient to retry."""
    offset = part.stat().st_size if part.exists() else 0
    if expected.size is not None and offset > expected.size:
        log.warning("%s is larger than the expected %s; starting again", part, _fmt_size(expected.size))
        _unlink(part)
        offset = 0
    resp, first, last = _open(url, offset, timeout)
    if resp is None:  # 416: nothing at or past `offset`
        _, total = _content_range_total(last)
        expected.learn(first, total, etag_is_sha256, url)
        if total is not None and total == offset:
            return  # the .part was already complete
        _unlink(part)
        raise _Transient(f"the server cannot resume at byte {offset:,}; starting again")
    with resp:
        if resp.status == 206:
            start, total = _content_range_total(last)
            if start != offset:
                _unlink(part)
                raise _Transient(f"the server resumed at byte {start} instead of {offset:,}; starting again")
        else:
            if offset:
                log.info("%s: the server ignored the Range request; downloading from the start", url)
            offset, total = 0, _int_header(last, "Content-Length")
        expected.learn(first, total, etag_is_sha256, url)
        got = offset
        bar = _progress_bar(expected.size, offset, part.name.removesuffix(".part"), progress)
        with open(part, "ab" if offset else "wb") as f, bar:
            try:
                while block := resp.read(CHUNK):
                    f.write(block)
                    got += len(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
                raise _Transient(f"the transfer broke off after {got:,} bytes ({e})") from e
    if expected.size is not None and got < expected.size:
        raise _Transient(f"the connection closed after {got:,} of {expected.size:,} bytes")
    if expected.size is not None and got > expected.size:
        _unlink(part)
        raise ChecksumMismatchError(
            f"{url}: received {got:,} bytes, more than the {expected.size:,} that {expected.size_from} announces; "
            "nothing was kept. Try again; if it persists the server or mirror is serving a different file"
        )


def _finish(url: str, part: Path, dest: Path, expected: _Expected) -> Path:
    """Verify the complete `part` (size, sha256), record the digest, and move it into place atomically.
    On a mismatch the part is deleted and ChecksumMismatchError raised."""
    got_size = part.stat().st_size
    digest = sha256_file(part)
    problem = None
    if expected.size is not None and got_size != expected.size:
        problem = f"size {_fmt_size(got_size)}, expected {_fmt_size(expected.size)} ({expected.size_from})"
    elif expected.sha256 is not None and digest != expected.sha256:
        problem = f"sha256 {digest}, expected {expected.sha256} ({expected.sha_from})"
    if problem:
        _unlink(part)
        raise ChecksumMismatchError(
            f"{url}: the downloaded file has {problem}. Nothing was kept in the cache ({dest.parent}). Try again; "
            "if it fails the same way, the server or mirror serves a different file than expected"
        )
    write_record(dest, digest)
    os.replace(part, dest)
    return dest


def fetch(
    url: str,
    dest: str | os.PathLike,
    *,
    size: int | None = None,
    sha256: str | None = None,
    etag_is_sha256: bool = False,
    offline: bool = False,
    force: bool = False,
    progress: bool = True,
    fix: str = "",
    retries: int | None = None,
    timeout: float | None = None,
    backoff: float | None = None,
) -> Path:
    """Make `dest` a verified copy of `url` and return it.

    A cached dest is checked with verify_cached (unless force). Otherwise (and unless offline, which raises
    OfflineError) the bytes stream into `<dest>.part`, resuming an existing one with a Range request, with
    `retries` retries and exponential backoff for transient failures; the result must match the pinned or
    announced size and sha256 before it is renamed into place. `fix` is the command suggested in errors.
    """
    dest = Path(dest)
    retries = RETRIES if retries is None else retries
    timeout = TIMEOUT_S if timeout is None else timeout
    backoff = BACKOFF_S if backoff is None else backoff
    if dest.exists() and not force:
        return verify_cached(dest, url, size=size, sha256=sha256, fix=fix)
    if offline:
        raise offline_error([(dest, url)], dest.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(lock_path(dest)):
        if dest.exists() and not force:  # another process finished it while we waited for the lock
            return verify_cached(dest, url, size=size, sha256=sha256, fix=fix)
        part = part_path(dest)
        if force:
            _unlink(part)
        if progress:
            print(f"dit-jax: downloading {url}\n      -> {dest}", file=sys.stderr)
        expected = _Expected(size, sha256)
        last = ""
        for attempt in range(retries + 1):
            try:
                _transfer(url, part, expected, etag_is_sha256=etag_is_sha256, timeout=timeout, progress=progress)
                return _finish(url, part, dest, expected)
            except ChecksumMismatchError:
                _unlink(part)
                raise
            except _Transient as e:
                last = str(e)
                if attempt < retries:
                    wait = backoff * 2**attempt
                    log.warning("%s: %s; retrying in %.1f s (%d/%d)", url, last, wait, attempt + 1, retries)
                    time.sleep(wait)
        have = part.stat().st_size if part.exists() else 0
        if not have:
            raise DownloadError(
                f"{url}: download failed after {retries + 1} attempt(s): {last}. Nothing was kept. Without network "
                f"access, copy the file to {dest} and use offline mode; or point $DIT_JAX_DIT_URL_BASE / "
                "$DIT_JAX_HF_URL_BASE at a mirror"
            )
        raise IncompleteDownloadError(
            f"{url}: download failed after {retries + 1} attempt(s): {last}. No file was put in the cache; the "
            f"partial file {part} ({have:,} bytes) is kept: run the same command again to resume, or delete it."
        )
