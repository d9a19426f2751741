"""CA files behind ``tls.ca_bundle``: re-read on change, identity by content."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import trustme

from proxy import errors
from proxy.ca_bundles import CABundles
from proxy.netguard import Guard
from proxy.policy import Auth, Provider, UpstreamTLS
from proxy.upstream import UpstreamPools

A = trustme.CA().cert_pem.bytes()
B = trustme.CA().cert_pem.bytes()


def test_content_is_read_once_and_again_only_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "ca.pem"
    path.write_bytes(A)
    bundles = CABundles()
    first = bundles.refresh([str(path)])
    assert [b.path for b in first] == [str(path)] and bundles.get(str(path)) == first[0]
    assert bundles.refresh([str(path)]) == []  # same stamp: not read
    path.write_bytes(b"# Issuer: CN=\xc3\xa9 comment only\n" + A)  # new stamp, same certificates
    assert bundles.refresh([str(path)]) == []
    path.write_bytes(B)  # in place: same inode, new content
    os.utime(path, ns=(1, 1))  # a stamp that moved even on a coarse clock
    (changed,) = bundles.refresh([str(path)])
    assert changed.digest != first[0].digest and bundles.get(str(path)) == changed
    assert "BEGIN CERTIFICATE" in changed.pem and "BEGIN" not in repr(changed)


@pytest.mark.parametrize(
    "content", [b"", b"not a certificate\n", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"]
)
def test_an_unusable_file_keeps_the_last_good_content(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ca.pem"
    path.write_bytes(A)
    bundles = CABundles()
    (good,) = bundles.refresh([str(path)])
    path.write_bytes(content)
    os.utime(path, ns=(2, 2))
    with caplog.at_level(logging.WARNING, "sidekey.upstream"):
        assert bundles.refresh([str(path)]) == []
    assert bundles.get(str(path)) == good
    assert f"tls.ca_bundle {path} " in caplog.text and "keeping its previous content" in caplog.text
    assert "AAAA" not in caplog.text


def test_a_provider_whose_ca_file_never_loaded_fails_as_a_tls_error(tmp_path: Path) -> None:
    pools = UpstreamPools()
    missing = str(tmp_path / "gone.pem")
    pools.ca_bundles.refresh([missing])
    provider = Provider("p", ("p.test",), None, Auth("none", None), tls=UpstreamTLS(ca_bundle=missing))
    with pytest.raises(errors.UpstreamTLSError):
        pools.key(provider, "https", "p.test", 443, Guard())
    (tmp_path / "gone.pem").write_bytes(A)
    pools.ca_bundles.refresh([missing])
    key = pools.key(provider, "https", "p.test", 443, Guard())
    assert key.ca_bundle is not None and key.ca_bundle.path == missing
