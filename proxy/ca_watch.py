"""Notice sidekey's CA files being replaced while it runs, and say so once.

The CA is loaded at start and kept in memory: every leaf minted until the
process restarts is signed by that key and chained to that certificate, so a
file replaced on disk never mixes a new key with the old chain. But an
operator who rotates the files should learn that the running process has not
picked them up: the change is logged once per change, with the new files'
fingerprints (SHA-256 of the certificate, of the key's *public* part), never
key material. The engine's upkeep calls ``check`` each second (a stat per file).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from proxy.policy.watch import Stamp, stamp

log = logging.getLogger("sidekey.certs")


def cert_fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def public_key_fingerprint(public_der: bytes) -> str:
    return hashlib.sha256(public_der).hexdigest()


@dataclass(frozen=True, slots=True)
class OnDisk:
    """What the CA files hold now: fingerprints, or why one cannot be read."""

    cert: str | None  # SHA-256 of the certificate (DER)
    key: str | None  # SHA-256 of the key's SubjectPublicKeyInfo (DER)
    problem: str | None = None  # fixed text naming the file, never its content
    matched: bool = True  # the key is the certificate's


def read_on_disk(cert_path: Path, key_path: Path) -> OnDisk:
    """Blocking (a thread): the fingerprints of the files as they are now."""
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        loaded = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert = cert_fingerprint(loaded)
    except OSError as err:
        return OnDisk(None, None, f"{cert_path} cannot be read ({err.strerror})")
    except ValueError:
        return OnDisk(None, None, f"{cert_path} is not a PEM certificate")
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as err:
        return OnDisk(cert, None, f"{key_path} cannot be read ({err.strerror})")
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return OnDisk(cert, None, f"{key_path} is not an unencrypted PEM private key")
    public = key.public_key().public_bytes(*spki)
    return OnDisk(cert, public_key_fingerprint(public), matched=public == loaded.public_key().public_bytes(*spki))


def describe(now: OnDisk, loaded_cert: str, loaded_key: str) -> str:
    """The one line logged for a change (pure: table-tested)."""
    kept = f"the CA loaded at start (certificate sha256 {loaded_cert[:16]}) stays in use until sidekey restarts"
    if now.problem is not None:
        return f"CA files changed on disk: {now.problem}; {kept}"
    if now.cert == loaded_cert and now.key == loaded_key:
        return f"CA files rewritten on disk with the same certificate and key; {kept}"
    match = "" if now.matched else " (the key does not match the certificate)"
    return (f"CA files changed on disk: certificate sha256 {now.cert and now.cert[:16]}, key's public key "
            f"sha256 {now.key and now.key[:16]}{match}; {kept}")  # fmt: skip


class CAFiles:
    """The CA files' stamps as loaded, compared each upkeep. A change is logged once the
    files have stayed the same for one more check, so a write in progress (a truncate
    then a write) is not reported half done."""

    def __init__(self, cert_path: Path, key_path: Path, loaded: tuple[str, str]) -> None:
        self.cert_path, self.key_path = cert_path, key_path
        self.loaded_cert, self.loaded_key = loaded
        self._reported = self._seen = self._stamps()
        self.changes = 0

    def _stamps(self) -> tuple[Stamp, Stamp]:
        return stamp(str(self.cert_path)), stamp(str(self.key_path))

    async def check(self) -> None:
        stamps = await asyncio.to_thread(self._stamps)
        settled = stamps == self._seen
        self._seen = stamps
        if not settled or stamps == self._reported:
            return
        self._reported = stamps
        self.changes += 1
        now = await asyncio.to_thread(read_on_disk, self.cert_path, self.key_path)
        log.warning("%s", describe(now, self.loaded_cert, self.loaded_key))
