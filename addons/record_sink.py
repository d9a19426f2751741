"""Where audit and dead-letter records go: a rotating JSON-lines file or stdout,
written in batches from a worker thread, and the query-parameter names both
treat as secrets (``SECRET_QUERY_PARAMS``, compared through ``normalize_name``).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any
from urllib.parse import unquote_plus

# Compared after unquoting, lower-casing and "-" -> "_", so "API-Key" matches too.
SECRET_QUERY_PARAMS = frozenset(
    {"key", "api_key", "apikey", "token", "access_token", "secret", "password", "signature", "sig"}
)


def normalize_name(name: str) -> str:
    """A query parameter or JSON key as compared with the secret names: unquoted, lower-case, "-" as "_"."""
    return unquote_plus(name).lower().replace("-", "_")


class FileSink:
    """Appends batches of lines to a file (0600), rotating by size like
    RotatingFileHandler: ``path`` -> ``path.1`` -> ... -> ``path.N``.
    ``durable``: fsync after each batch and before rotating (the DLQ's records
    are requests to replay; the audit log trades that for speed)."""

    def __init__(self, path: str, max_bytes: int, backups: int, *, durable: bool = False) -> None:
        self.path, self.max_bytes, self.backups, self.durable = path, max_bytes, backups, durable
        self._lock = threading.Lock()  # a flush thread and done() may overlap
        self._file = self._open()

    def _open(self) -> Any:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # the umask can neither widen nor narrow it
        f = os.fdopen(fd, "ab")
        self._size = f.tell()
        return f

    def write(self, lines: list[str]) -> None:
        with self._lock:
            chunk: list[bytes] = []
            size = self._size
            for line in lines:
                data = line.encode("utf-8") + b"\n"
                if self.max_bytes and size and size + len(data) > self.max_bytes:
                    self._file.write(b"".join(chunk))
                    self._rotate()
                    chunk, size = [], 0
                chunk.append(data)
                size += len(data)
            self._file.write(b"".join(chunk))
            self._file.flush()
            self._size = size
            if self.durable and not self._file.closed:
                os.fsync(self._file.fileno())

    def _rotate(self) -> None:
        if self.durable:
            self._file.flush()
            os.fsync(self._file.fileno())
        self._file.close()
        for n in range(self.backups - 1, 0, -1):
            older = f"{self.path}.{n}"
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{n + 1}")
        os.replace(self.path, f"{self.path}.1")
        self._file = self._open()

    def close(self) -> None:
        with self._lock:
            self._file.close()


class StdoutSink:
    def write(self, lines: list[str]) -> None:
        sys.stdout.write("".join(line + "\n" for line in lines))
        sys.stdout.flush()

    def close(self) -> None:
        sys.stdout.flush()
