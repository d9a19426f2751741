"""The CA key file replaced while sidekey runs.

The CA is loaded once, at start: leaves minted afterwards are still signed
by the loaded key and chained to the loaded certificate (a client trusting
the original CA accepts them: no mixed chain), the process stays up, and the
change is logged once, with the new key's public fingerprint and never key
material. A file that is no key at all is logged once too.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from proxy.certs import CA_KEY_NAME, CertificateAuthority
from tests.faults.conftest import StartProxy, assert_clean_after, curl_status, fault_policy
from tests.faults.fault_upstream import FaultUpstream
from tests.faults.leaks import assert_back_to, holdings
from tests.integration.sidekey_process import SidekeyProcess

UPKEEP = 1.0  # seconds: proxy/server.py POOL_CHECK_INTERVAL, when the CA files are stat'ed
CHANGED = "CA files changed on disk"


def replace(path: Path, data: bytes) -> None:
    """As a secret rotation does: a new file renamed over the old one (mode 0600)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    tmp.chmod(0o600)
    os.replace(tmp, path)


def wait_logged(proxy: SidekeyProcess, text: str, count: int) -> None:
    deadline = time.monotonic() + 30
    while proxy.log().count(text) < count:
        assert time.monotonic() < deadline, f"never logged: {text}"
        time.sleep(0.1)
    time.sleep(3 * UPKEEP)  # three more checks of unchanged files: nothing more is said
    assert proxy.log().count(text) == count


def test_a_replaced_ca_key_keeps_the_loaded_ca_and_is_logged_once(
    start_proxy: StartProxy, fault: FaultUpstream, stalled: FaultUpstream, tmp_path: Path
) -> None:
    policy = fault_policy(fault, stalled).replace("hosts: [faulty.test]", 'hosts: [faulty.test, "*.faulty.test"]')
    proxy = start_proxy(policy)
    assert curl_status(proxy, "https://faulty.test/ok")[0] == "200"
    baseline = assert_back_to(proxy, holdings(proxy))
    original_ca = tmp_path / "original-ca.pem"
    original_ca.write_bytes(proxy.ca_path.read_bytes())

    other = CertificateAuthority.load_or_create(tmp_path / "other-ca")
    new_key_pem = other.key_path.read_bytes()
    replace(proxy.certs / CA_KEY_NAME, new_key_pem)
    wait_logged(proxy, CHANGED, 1)
    public = other.fingerprints()[1]
    line = next(line for line in proxy.log().splitlines() if CHANGED in line)
    assert f"key's public key sha256 {public[:16]}" in line and "does not match the certificate" in line

    # New hosts mint new leaves: each still verifies against the original CA alone.
    outputs = []
    for host in ("a.faulty.test", "b.faulty.test", "faulty.test"):
        status, body, err = curl_status(proxy, f"https://{host}/ok", "--cacert", str(original_ca))
        assert status == "200", err
        outputs.append(body + err)

    replace(proxy.certs / CA_KEY_NAME, b"not a key\n")
    wait_logged(proxy, "is not an unencrypted PEM private key", 1)
    assert curl_status(proxy, "https://c.faulty.test/ok", "--cacert", str(original_ca))[0] == "200"

    assert_clean_after(proxy, baseline, *outputs)
    log = proxy.log()
    assert "PRIVATE KEY" not in log
    body_lines = [ln for ln in new_key_pem.decode().splitlines() if ln and not ln.startswith("-----")]
    assert not any(ln in log for ln in body_lines), "key material in the log"
    assert hashlib.sha256(new_key_pem).hexdigest() not in log
    assert serialization.load_pem_private_key(new_key_pem, None)  # the probe above looked at a real key
