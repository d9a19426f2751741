"""Where audit and dead-letter records go: a rotating JSON-lines file or stdout,
written in batches from a worker thread, and the query-parameter names both
treat as secrets (``SECRET_QUERY_PARAMS``, compared through ``normalize_name``).

A full disk (or a file size limit) must neither stop the proxy nor hide the
loss: the file is written through its descriptor, unbuffered, so a batch is
either appended whole or cut back to where it began (no torn line, nothing
left in a buffer to surface later), and ``WriteFailed`` says how many lines
were lost. ``Losses`` counts them and logs once when writes start failing and
once when they work again (``sidekey_audit_lines_lost_total``,
``sidekey_dlq_entries_lost_total``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from urllib.parse import unquote_plus

# Compared after unquoting, lower-casing and "-" -> "_", so "API-Key" matches too.
SECRET_QUERY_PARAMS = frozenset(
    {"key", "api_key", "apikey", "token", "access_token", "secret", "password", "signature", "sig"}
)


def normalize_name(name: str) -> str:
    """A query parameter or JSON key as compared with the secret names: unquoted, lower-case, "-" as "_"."""
    return unquote_plus(name).lower().replace("-", "_")


class WriteFailed(OSError):
    """A batch, or its tail, was not written: ``lost`` lines, for ``reason`` (the OS's fixed text)."""

    def __init__(self, lost: int, reason: str) -> None:
        super().__init__(reason)
        self.lost, self.reason = lost, reason


def reason_of(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0)
    return f"{name}: {exc.strerror}" if name and exc.strerror else type(exc).__name__


class Losses:
    """Lines lost to failed writes: counted each time; said once when writes start failing
    and once when they work again, at most once a minute (not once per batch, every quarter
    second, nor again each time a nearly full disk takes one small batch and refuses the next)."""

    __slots__ = ("what", "metric", "log", "clock", "total", "_lost_now", "_said_at")

    QUIET = 60.0  # seconds after a failure is logged in which another is only counted

    def __init__(
        self, what: str, metric: str, log: logging.Logger, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.what, self.metric, self.log, self.clock = what, metric, log, clock
        self.total = 0
        self._lost_now: int | None = None  # lost since the logged failure; None: nothing to report
        self._said_at: float | None = None

    def failed(self, lost: int, reason: str) -> None:
        self.total += lost
        now = self.clock()
        if self._lost_now is None and (self._said_at is None or now - self._said_at >= self.QUIET):
            self._said_at, self._lost_now = now, 0
            self.log.error("%s write failed (%s): %s are lost until writes work again, counted in %s",
                           self.what, reason, self.what, self.metric)  # fmt: skip
        if self._lost_now is not None:
            self._lost_now += lost

    def succeeded(self) -> None:
        if self._lost_now is not None:
            self.log.warning("%s writes work again; %d lost meanwhile", self.what, self._lost_now)
            self._lost_now = None


def check_sizes(owner: str, sizes: dict[str, int]) -> None:
    """The audit log's and the DLQ's size settings, checked once where they are built:
    none negative, and rotation by size (``max_bytes`` > 0) only with a backup to rotate
    to, since rotating with none would reopen the same file and never shrink it."""
    if any(value < 0 for value in sizes.values()):
        *first, last = sizes
        raise ValueError(f"{owner}: {', '.join(first)} and {last} must not be negative")
    if sizes.get("max_bytes", 0) > 0 and sizes.get("backups") == 0:
        raise ValueError(f"{owner}: rotation by size needs at least one backup")


class FileSink:
    """Appends batches of lines to a file (0600), rotating by size like
    RotatingFileHandler: ``path`` -> ``path.1`` -> ... -> ``path.N``.
    ``durable``: fsync after each batch and before rotating (the DLQ's records
    are requests to replay; the audit log trades that for speed).
    A failed write raises ``WriteFailed`` with the lines not written."""

    def __init__(self, path: str, max_bytes: int, backups: int, *, durable: bool = False) -> None:
        self.path, self.max_bytes, self.backups, self.durable = path, max_bytes, backups, durable
        self._lock = threading.Lock()  # a flush thread and done() may overlap
        self._fd = self._open()

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # the umask can neither widen nor narrow it
        self._size = os.fstat(fd).st_size
        return fd

    def write(self, lines: list[str]) -> None:
        with self._lock:
            written = 0  # lines safely in a file
            chunk: list[bytes] = []
            try:
                if self._fd < 0:  # a rotation could not open the new file: try again
                    self._fd = self._open()
                size = self._size
                for line in lines:
                    data = line.encode("utf-8") + b"\n"
                    if self.max_bytes and size and size + len(data) > self.max_bytes:
                        self._append(b"".join(chunk))
                        written += len(chunk)
                        self._rotate()
                        chunk, size = [], 0
                    chunk.append(data)
                    size += len(data)
                self._append(b"".join(chunk))
            except OSError as exc:
                raise WriteFailed(len(lines) - written, reason_of(exc)) from None

    def _append(self, data: bytes) -> None:
        """All of ``data`` or none of it: a short write (the disk filled mid-way) is cut back."""
        view, done = memoryview(data), 0
        try:
            while done < len(data):
                done += os.write(self._fd, view[done:])
            if self.durable:
                os.fsync(self._fd)
        except OSError:
            if done:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._size)
            raise
        self._size += len(data)

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = -1
        for n in range(self.backups - 1, 0, -1):
            older = f"{self.path}.{n}"
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{n + 1}")
        os.replace(self.path, f"{self.path}.1")
        self._fd = self._open()

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class StdoutSink:
    def write(self, lines: list[str]) -> None:
        sys.stdout.write("".join(line + "\n" for line in lines))
        sys.stdout.flush()

    def close(self) -> None:
        sys.stdout.flush()
