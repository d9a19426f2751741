"""The providers' extra upstream CA files (``tls.ca_bundle``), re-read when
their content changes.

A pool's identity holds the digest of the certificates it trusts, not only the
path, so replacing the file (an edit, a rename over it, a Kubernetes Secret's
symlink swap) gives new connections a context built from the new content while
the old pool drains. The request path only reads a dict; ``refresh`` (blocking:
run it in a thread) stats each file and reads one again only when its stamp
(device, inode, mtime, size) moved. A file that cannot be used keeps the last
good content; the problem is logged once per version of the file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field

log = logging.getLogger("sidekey.upstream")

# The certificate blocks only: comments around them (the Mozilla bundle's
# "# Issuer: ..." lines, some not ASCII) neither count in the identity nor
# reach ``load_verify_locations(cadata=...)``, which takes ASCII PEM only.
_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+?-----END CERTIFICATE-----")

Stamp = tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class CABundle:
    path: str
    digest: str  # sha256 of the certificate blocks, hex; with the path, the trust identity
    pem: str = field(compare=False, repr=False)

    @property
    def short(self) -> str:
        """The digest as logs show it."""
        return self.digest[:12]


def read_bundle(path: str) -> CABundle:
    """Read and check one CA file (blocking). Raises ValueError with a fixed
    reason (never the file's bytes) when it holds no usable certificate."""
    with open(path, "rb") as f:
        raw = f.read()
    blocks = _CERT.findall(raw)
    if not blocks:
        raise ValueError("holds no PEM certificate")
    pem = b"\n".join(blocks)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem.decode("ascii"))
    except ssl.SSLError:
        raise ValueError("holds a certificate that does not parse") from None
    return CABundle(path, hashlib.sha256(pem).hexdigest(), pem.decode("ascii"))


def _stamp(path: str) -> Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class CABundles:
    """The current content of every watched CA file."""

    def __init__(self) -> None:
        self._current: dict[str, CABundle] = {}
        self._stamps: dict[str, Stamp | None] = {}
        self.changes = 0

    def get(self, path: str) -> CABundle | None:
        """The last good content of ``path``; None if it never had any."""
        return self._current.get(path)

    def refresh(self, paths: Iterable[str]) -> list[CABundle]:
        """Watch exactly ``paths``; re-read those whose file changed (blocking:
        run in a thread). Returns the bundles whose content changed."""
        watched = dict.fromkeys(paths)
        # Content of a path no longer named stays: a flow on the previous
        # policy snapshot may still retry through it.
        self._stamps = {p: s for p, s in self._stamps.items() if p in watched}
        changed: list[CABundle] = []
        for path in watched:
            stamp = _stamp(path)
            if path in self._stamps and stamp == self._stamps[path]:
                continue
            self._stamps[path] = stamp
            before = self._current.get(path)
            try:
                if stamp is None:
                    raise ValueError("cannot be found")
                bundle = read_bundle(path)
            except (OSError, ValueError) as exc:
                reason = str(exc) if isinstance(exc, ValueError) else f"cannot be read ({type(exc).__name__})"
                keeping = "keeping its previous content" if before else "requests through it fail"
                log.warning("tls.ca_bundle %s %s; %s", path, reason, keeping)
                continue
            if bundle != before:
                self._current[path] = bundle
                changed.append(bundle)
                if before is not None:
                    self.changes += 1
                    log.info("tls.ca_bundle %s changed (sha256 %s); new upstream connections trust it", path,
                             bundle.short)  # fmt: skip
        return changed

    def statistics(self) -> dict[str, int]:
        return {"watched": len(self._stamps), "loaded": len(self._current), "changes": self.changes}

    def __repr__(self) -> str:
        return f"CABundles(watched={len(self._stamps)}, loaded={len(self._current)})"
