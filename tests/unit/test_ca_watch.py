"""The line logged when sidekey's CA files change on disk (``proxy.ca_watch.describe``),
and the fingerprints it is built from: never key material."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.ca_watch import OnDisk, describe, read_on_disk
from proxy.certs import CertificateAuthority

CERT, KEY = "c" * 64, "k" * 64
KEPT = f"the CA loaded at start (certificate sha256 {'c' * 16}) stays in use until sidekey restarts"

CASES = [
    ("same files rewritten", OnDisk(CERT, KEY), f"CA files rewritten on disk with the same certificate and key; {KEPT}"),
    ("a new pair", OnDisk("d" * 64, "e" * 64),
     f"CA files changed on disk: certificate sha256 {'d' * 16}, key's public key sha256 {'e' * 16}; {KEPT}"),
    ("the key alone replaced", OnDisk(CERT, "e" * 64, matched=False),
     f"CA files changed on disk: certificate sha256 {'c' * 16}, key's public key sha256 {'e' * 16} "
     f"(the key does not match the certificate); {KEPT}"),
    ("an unreadable file", OnDisk(CERT, None, "/x/sidekey-ca-key.pem is not an unencrypted PEM private key"),
     f"CA files changed on disk: /x/sidekey-ca-key.pem is not an unencrypted PEM private key; {KEPT}"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "now", "line"), CASES, ids=[c[0] for c in CASES])
def test_the_change_is_described_by_fingerprints(name: str, now: OnDisk, line: str) -> None:
    assert describe(now, CERT, KEY) == line


def test_fingerprints_on_disk_are_those_of_the_loaded_ca_and_hold_no_key(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path)
    now = read_on_disk(ca.cert_path, ca.key_path)
    assert (now.cert, now.key) == ca.fingerprints() and now.problem is None and now.matched
    key_pem = ca.key_path.read_text()
    assert not any(line in describe(now, *ca.fingerprints()) for line in key_pem.splitlines()[1:-1])
    ca.key_path.write_text("garbage\n")
    assert read_on_disk(ca.cert_path, ca.key_path).problem == f"{ca.key_path} is not an unencrypted PEM private key"
