"""Secret values, read from the environment or from files.

File secrets are re-read when the file changes (inode, mtime or size), so a
mounted Kubernetes Secret (an atomic symlink swap) rotates without a restart.
Checks run off the event loop in ``refresh()``; the request path only reads
a dict. Values are validated for use in a header: a secret with CR, LF or
other control characters is treated as unavailable (and said so by source,
never by value).

``read_secret`` is the one reader of a secret's value: the store, the Redis
URL and alerts webhook (``resolve_ref``) and ``sidekey check``
all go through it, so they agree on what "missing" and "unusable" mean.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping

from proxy.policy import Policy, SecretRef

log = logging.getLogger("sidekey.secrets")

_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
MAX_SECRET_BYTES = 16384


def read_secret(ref: SecretRef, environ: Mapping[str, str] | None = None) -> tuple[str | None, str | None]:
    """``(value, None)``, or ``(None, problem)`` where the problem reads after
    the source (``env:KEY`` "is not set", ``file:/x`` "is missing"); never
    the value. Blocking for ``file:``: call it off the event loop."""
    if ref.kind not in ("env", "file"):
        return None, "is read from its store by the running sidekey"
    if ref.kind == "env":
        return _clean((os.environ if environ is None else environ).get(ref.ref), "is not set")
    try:
        with open(ref.ref, encoding="utf-8") as f:
            if os.fstat(f.fileno()).st_size > MAX_SECRET_BYTES:
                return None, "is too large to be a credential"
            raw = f.read(MAX_SECRET_BYTES + 1)
    except FileNotFoundError:
        return None, "is missing"
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"is unreadable ({type(exc).__name__})"
    return _clean(raw, "is empty")


def resolve_ref(ref: str | SecretRef) -> str | None:
    """A value given in the policy as is, or read from ``env:NAME`` / ``file:PATH``
    (blocking for file:); None when missing, empty or unusable (see ``read_secret``)."""
    if not isinstance(ref, SecretRef):
        return ref
    return read_secret(ref)[0]


def check_value(raw: str) -> tuple[str | None, str | None]:
    """A fetched value (a secret store's, a token endpoint's) as ``read_secret``
    would give it: stripped, and refused if it could not go in a header."""
    return _clean(raw, "is empty")


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


def secret_uses(policy: Policy) -> Iterator[tuple[str, SecretRef]]:
    """Every secret the policy reads, each with who reads it (``provider
    openai``, ``provider openai, upstream key-b``, ``redis.url``,
    ``alerts.webhook``), each pair once, in file order. A provider's
    ``auth.secret`` is named only when some member falls back to it."""
    seen: set[tuple[str, SecretRef]] = set()
    for p in policy.providers:
        if p.auth.type == "none":
            continue
        for t in p.targets:
            ref = p.secret_of(t)
            who = f"provider {p.name}" if t.secret is None else f"provider {p.name}, upstream {t.name}"
            if ref is not None and (who, ref) not in seen:
                seen.add((who, ref))
                yield who, ref
        for ref in p.auth.sigv4.refs() if p.auth.sigv4 is not None else ():
            yield f"provider {p.name}, aws key", ref
    if policy.redis is not None and isinstance(policy.redis.url, SecretRef):
        yield "redis.url", policy.redis.url
    if policy.alerts is not None and isinstance(policy.alerts.webhook, SecretRef):
        yield "alerts.webhook", policy.alerts.webhook


class SecretStore:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = environ if environ is not None else os.environ
        self._values: dict[SecretRef, str] = {}
        self._file_stamp: dict[str, tuple[int, int, int]] = {}
        self._problems: dict[SecretRef, str] = {}
        self.refs: tuple[SecretRef, ...] = ()
        # The refresher and an on-demand re-read (an upstream 401) may run in two threads.
        self._refreshing = threading.Lock()

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
        with self._refreshing:
            return self._refresh()

    def _refresh(self) -> list[SecretRef]:
        changed: list[SecretRef] = []
        for ref in self.refs:
            before = self._values.get(ref)
            stamp = _stamp(ref.ref) if ref.kind == "file" else None
            if stamp is not None and ref in self._values and self._file_stamp.get(ref.ref) == stamp:
                continue  # unchanged file: not re-read
            value, problem = read_secret(ref, self._environ)
            if stamp is not None and value is not None:
                # Taken before the read: a file replaced in between is read again next time.
                self._file_stamp[ref.ref] = stamp
            else:
                self._file_stamp.pop(ref.ref, None)
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

    def statistics(self) -> dict[str, int]:
        return {"watched": len(self.refs), "available": len(self._values), "unavailable": len(self._problems)}

    def __repr__(self) -> str:  # never values
        return f"SecretStore(watched={len(self.refs)}, available={len(self._values)})"


def _stamp(path: str) -> tuple[int, int, int] | None:
    """What tells a changed file from the same one (a Kubernetes update swaps the inode)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size
