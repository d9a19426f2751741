"""Trusting sidekey's CA: the system bundle plus ours, and the words that
explain it (``sidekey ca``). Split from ``certs`` (which mints) because
nothing here runs in the proxy itself."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from proxy.certs import PEM_CERT, atomic_write

_SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Gentoo, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",  # RHEL, Fedora, CentOS
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",  # RHEL 7+
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/ssl/cert.pem",  # Alpine, macOS, BSDs
    "/usr/local/etc/openssl/cert.pem",  # macOS Homebrew
)


def system_ca_file() -> Path | None:
    """The system CA bundle to extend, or None. Deliberately not ``SSL_CERT_FILE``: it may
    point at a bundle ``write_trust_bundle`` wrote, and extending that would nest our output."""
    candidates = [ssl.get_default_verify_paths().openssl_cafile, *_SYSTEM_BUNDLES]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate):
            return Path(candidate)
    try:
        import certifi
    except ImportError:
        return None
    return Path(certifi.where())


_BUNDLE_MARK = b"# sidekey CA\n"


def _pem_body(block: bytes) -> bytes:
    return b"".join(block.split())  # compare blocks regardless of line endings


def write_trust_bundle(ca_cert_path: Path, out_path: Path) -> Path:
    """Write system CAs plus sidekey's CA to ``out_path`` (atomic, 0644).

    Every certificate in the CA file goes in, not only the first (the one
    sidekey signs with): during a CA rotation the file holds the signing CA
    followed by the one still trusted, and clients must trust both."""
    blocks = [m.group(0).strip() + b"\n" for m in PEM_CERT.finditer(Path(ca_cert_path).read_bytes())]
    if not blocks:
        raise ValueError(f"{ca_cert_path} is not a PEM certificate")
    bodies: set[bytes] = set()
    unique = []
    for block in blocks:
        if _pem_body(block) not in bodies:
            bodies.add(_pem_body(block))
            unique.append(block)
    ca_pem = b"".join(unique)
    system = system_ca_file()
    base = system.read_bytes() if system is not None else b""
    # Drop any copy of our CA already present, so the output holds it once
    # however often this runs and whatever the system bundle holds.
    base = PEM_CERT.sub(lambda m: b"" if _pem_body(m.group(0)) in bodies else m.group(0), base)
    base = base.replace(_BUNDLE_MARK, b"")
    base = base.rstrip() + b"\n\n" if base.strip() else b""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, base + _BUNDLE_MARK + ca_pem, 0o644)
    return out_path


def trust_instructions(ca_cert_path: Path) -> str:
    """Human text for ``sidekey ca``."""
    ca = str(ca_cert_path)
    return f"""\
sidekey CA certificate: {ca}

Clients must trust this CA to talk HTTPS through sidekey.

Python (requests, httpx, openai / anthropic SDKs):
  SSL_CERT_FILE *replaces* the system trust store, so point it at a bundle of
  the system CAs plus sidekey's, written by `sidekey ca --bundle PATH`:
    sidekey ca --bundle ~/.sidekey/bundle.pem
    export SSL_CERT_FILE=~/.sidekey/bundle.pem
    export REQUESTS_CA_BUNDLE=~/.sidekey/bundle.pem

Node.js (extends the built-in store, so the CA alone is enough):
    export NODE_EXTRA_CA_CERTS={ca}

curl:
    export CURL_CA_BUNDLE=~/.sidekey/bundle.pem    # or: curl --cacert {ca} ...

Then send traffic through the proxy:
    export HTTPS_PROXY=http://127.0.0.1:8080
"""
