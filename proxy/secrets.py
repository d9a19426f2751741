"""Secret values, read from the environment or from files.

File secrets are re-read when the file changes (inode, mtime or size), so a
mounted Kubernetes Secret (an atomic symlink swap) rotates without a restart.
Checks run off the event loop in ``refresh()``; the request path only reads
a dict. Values are validated for use in a header: a secret with CR, LF or
other control characters is treated as unavailable (and said so by source,
never by value).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping

from proxy.policy import SecretRef

log = logging.getLogger("sidekey.secrets")

_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
MAX_SECRET_BYTES = 16384


class SecretStore:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = environ if environ is not None else os.environ
        self._values: dict[SecretRef, str] = {}
        self._file_stamp: dict[str, tuple[int, int, int]] = {}
        self._problems: dict[SecretRef, str] = {}
        self.refs: tuple[SecretRef, ...] = ()

    def watch(self, refs: Iterable[SecretRef]) -> None:
        self.refs = tuple(dict.fromkeys(refs))

    def get(self, ref: SecretRef) -> str | None:
        """The current value, or None when missing or unusable."""
        return self._values.get(ref)

    def problem(self, ref: SecretRef) -> str | None:
        return self._problems.get(ref)

    def refresh(self) -> list[SecretRef]:
        """Re-read every watched secret (blocking: run in a thread).
        Returns the refs whose availability or value changed."""
        changed: list[SecretRef] = []
        for ref in self.refs:
            before = self._values.get(ref)
            if ref.kind == "env":
                value, problem = self._clean(self._environ.get(ref.ref), "is not set")
            else:
                value, problem = self._read_file(ref)
                if problem is None and value is None:
                    continue  # unchanged file
            self._set(ref, value, problem)
            if self._values.get(ref) != before:
                changed.append(ref)
        return changed

    def _set(self, ref: SecretRef, value: str | None, problem: str | None) -> None:
        if value is None:
            known = ref in self._values or ref in self._problems
            self._values.pop(ref, None)
            # A change is warned here; a secret missing from the first read is
            # warned once by whoever watches it, naming what it is for.
            if known and self._problems.get(ref) != problem:
                log.warning("secret %s %s", ref.source, problem)
            self._problems[ref] = problem or "is unavailable"
        else:
            if ref in self._problems:
                log.info("secret %s is available", ref.source)
            self._values[ref] = value
            self._problems.pop(ref, None)

    def _read_file(self, ref: SecretRef) -> tuple[str | None, str | None]:
        try:
            st = os.stat(ref.ref)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self._file_stamp.get(ref.ref) == stamp and ref in self._values:
                return None, None
            if st.st_size > MAX_SECRET_BYTES:
                return None, "is too large to be a credential"
            with open(ref.ref, encoding="utf-8") as f:
                raw = f.read()
            self._file_stamp[ref.ref] = stamp
        except FileNotFoundError:
            self._file_stamp.pop(ref.ref, None)
            return None, "file does not exist"
        except (OSError, UnicodeDecodeError) as exc:
            self._file_stamp.pop(ref.ref, None)
            return None, f"file cannot be read ({type(exc).__name__})"
        return self._clean(raw, "file is empty")

    @staticmethod
    def _clean(raw: str | None, missing: str) -> tuple[str | None, str | None]:
        if raw is None:
            return None, missing
        value = raw.strip()  # a trailing newline is the norm in mounted files
        if not value:
            return None, "is empty"
        if _UNSAFE.search(value):
            return None, "contains control characters (refused: header injection)"
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            return None, "contains characters that cannot go in an HTTP header"
        return value, None

    def statistics(self) -> dict[str, int]:
        return {"watched": len(self.refs), "available": len(self._values), "unavailable": len(self._problems)}

    def __repr__(self) -> str:  # never values
        return f"SecretStore(watched={len(self.refs)}, available={len(self._values)})"
