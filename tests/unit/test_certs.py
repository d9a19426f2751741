"""proxy.certs: the CA on disk, leaf minting, the context cache over real TLS,
and the trust bundle."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import re
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from proxy import trust
from proxy.certs import CertificateAuthority, normalize_host
from proxy.leaf_contexts import LeafContexts

HOST = "api.example.test"


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca")


@pytest.fixture
def leaves(ca: CertificateAuthority) -> Iterator[LeafContexts]:
    contexts = LeafContexts(ca)
    yield contexts
    contexts.close()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _client_ctx(ca: CertificateAuthority) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # what Python 3.13 turns on by default
    ctx.set_alpn_protocols(["h2", "http/1.1"])  # the proxy must still pick http/1.1
    return ctx


async def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str) -> str | None:
    """Real TLS over loopback; returns the ALPN protocol the client saw."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname=server_hostname), 10
        )
        try:
            alpn: str | None = writer.get_extra_info("ssl_object").selected_alpn_protocol()
            assert await asyncio.wait_for(reader.read(), 10) == b"hello"
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return alpn
    finally:
        server.close()
        await server.wait_closed()


def _leaf(chain_pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificates(chain_pem)[0]


# -- the CA on disk -----------------------------------------------------------
def test_ca_created_private_and_reloaded_identically(tmp_path: Path) -> None:
    d = tmp_path / "nested" / "ca"
    first = CertificateAuthority.load_or_create(d)
    assert _mode(d) == 0o700
    assert _mode(first.key_path) == 0o600
    assert first.cert_path == d / "sidekey-ca.pem"
    assert first.key_path == d / "sidekey-ca-key.pem"
    cert_bytes, key_bytes = first.cert_path.read_bytes(), first.key_path.read_bytes()

    second = CertificateAuthority.load_or_create(d)
    assert second.cert_path.read_bytes() == cert_bytes
    assert second.key_path.read_bytes() == key_bytes
    # A leaf from the reloaded CA chains to the original certificate.
    chain = x509.load_pem_x509_certificates(second.mint_leaf(HOST)[0])
    chain[0].verify_directly_issued_by(x509.load_pem_x509_certificate(cert_bytes))


def test_ca_certificate_profile(ca: CertificateAuthority) -> None:
    cert = x509.load_pem_x509_certificate(ca.cert_path.read_bytes())
    key = serialization.load_pem_private_key(ca.key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert cert.version == x509.Version.v3
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "sidekey CA"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "sidekey"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert ku.value.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    now = dt.datetime.now(dt.UTC)
    assert now - dt.timedelta(hours=2) < cert.not_valid_before_utc < now
    assert cert.not_valid_after_utc - now > dt.timedelta(days=3640)


def test_custom_common_name(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, common_name="team CA")
    cert = x509.load_pem_x509_certificate(ca.cert_path.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "team CA"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path)
    os.chmod(ca.key_path, mode)
    with pytest.raises(ValueError, match="group or others") as err:
        CertificateAuthority.load_or_create(tmp_path)
    assert str(ca.key_path) in str(err.value)
    assert "PRIVATE" not in str(err.value)


@pytest.mark.parametrize("remove", ["sidekey-ca.pem", "sidekey-ca-key.pem"])
def test_only_one_file_present_is_an_error(tmp_path: Path, remove: str) -> None:
    CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / remove).unlink()
    with pytest.raises(ValueError, match="missing") as err:
        CertificateAuthority.load_or_create(tmp_path)
    assert remove in str(err.value)


def test_garbage_key_error_names_path_not_content(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path)
    ca.key_path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWJ5dGVz\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ValueError) as err:
        CertificateAuthority.load_or_create(tmp_path)
    assert str(ca.key_path) in str(err.value)
    assert "c2VjcmV0" not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_mismatched_key_is_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "a")
    other = CertificateAuthority.load_or_create(tmp_path / "b")
    ca.key_path.write_bytes(other.key_path.read_bytes())
    with pytest.raises(ValueError, match="is not the key of"):
        CertificateAuthority.load_or_create(tmp_path / "a")


def test_repr_shows_no_key_material(ca: CertificateAuthority, leaves: LeafContexts) -> None:
    key_body = b"".join(ca.key_path.read_bytes().splitlines()[1:-1]).decode()
    for text in (repr(ca), repr(leaves)):
        assert "PRIVATE" not in text and key_body[:20] not in text
    assert repr(leaves) == "<LeafContexts entries=0/2048 hits=0 misses=0 in_flight=0>"


# -- leaf minting --------------------------------------------------------------
def test_leaf_profile_and_strict_verification(ca: CertificateAuthority) -> None:
    chain_pem, key_pem = ca.mint_leaf(HOST)
    chain = x509.load_pem_x509_certificates(chain_pem)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_path.read_bytes())
    assert len(chain) == 2 and chain[1] == ca_cert
    leaf = chain[0]
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == HOST
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == [HOST] and not san.critical
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    now = dt.datetime.now(dt.UTC)
    assert abs(leaf.not_valid_before_utc - (now - dt.timedelta(days=1))) < dt.timedelta(minutes=1)
    assert abs(leaf.not_valid_after_utc - (now + dt.timedelta(days=365))) < dt.timedelta(minutes=1)
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    # cryptography's RFC 5280 / CA-B-Forum path validator is stricter than OpenSSL.
    verifier = PolicyBuilder().store(Store([ca_cert])).time(now).build_server_verifier(x509.DNSName(HOST))
    verifier.verify(leaf, [])


def test_one_leaf_key_per_ca_and_random_serials(ca: CertificateAuthority) -> None:
    (c1, k1), (c2, k2) = ca.mint_leaf("a.example.test"), ca.mint_leaf("b.example.test")
    assert k1 == k2
    assert _leaf(c1).serial_number != _leaf(c2).serial_number


@pytest.mark.parametrize(
    ("host", "kind", "value"),
    [
        ("127.0.0.1", x509.IPAddress, ipaddress.ip_address("127.0.0.1")),
        ("[::1]", x509.IPAddress, ipaddress.ip_address("::1")),
        ("2001:DB8:0:0::1", x509.IPAddress, ipaddress.ip_address("2001:db8::1")),
        ("API.Example.TEST.", x509.DNSName, "api.example.test"),
        ("bücher.example", x509.DNSName, "xn--bcher-kva.example"),
        ("_dmarc.example.test", x509.DNSName, "_dmarc.example.test"),
    ],
)
def test_san_forms(ca: CertificateAuthority, host: str, kind: type[x509.GeneralName], value: object) -> None:
    san = _leaf(ca.mint_leaf(host)[0]).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(kind) == [value]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "host",
    [
        "",
        ".",
        "a..b",
        "-lead.example",
        "trail-.example",
        "host:443",
        "sp ace.example",
        "x" * 64 + ".example",
        ("a" * 60 + ".") * 5,
        "fe80::1%eth0",
        "[127.0.0.1]",
        "[nope]",
        "a/b.example",
        "xn--\udcff.example",
    ],
)
def test_invalid_hosts_rejected_without_echo(ca: CertificateAuthority, host: str) -> None:
    with pytest.raises(ValueError) as err:
        ca.mint_leaf(host)
    if host:
        assert host not in str(err.value)


def test_long_host_omits_cn_and_marks_san_critical(ca: CertificateAuthority) -> None:
    host = "a" * 60 + ".long.example.test"
    leaf = _leaf(ca.mint_leaf(host)[0])
    assert len(leaf.subject) == 0
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical


def test_leaf_never_outlives_the_ca(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "short CA")])
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "sidekey-ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = tmp_path / "sidekey-ca-key.pem"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    ca = CertificateAuthority.load_or_create(tmp_path)
    assert _leaf(ca.mint_leaf(HOST)[0]).not_valid_after_utc == cert.not_valid_after_utc


# -- LeafContexts over real TLS -------------------------------------------------
@pytest.mark.asyncio
async def test_handshake_verifies_strictly_and_negotiates_http11(
    ca: CertificateAuthority, leaves: LeafContexts
) -> None:
    server_ctx = await leaves.context_for(HOST)
    assert server_ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server_ctx.options & ssl.OP_NO_COMPRESSION
    assert await _handshake(server_ctx, _client_ctx(ca), HOST) == "http/1.1"
    assert leaves.statistics()["sni_mismatches"] == 0


@pytest.mark.asyncio
async def test_wrong_sni_aborts_handshake(ca: CertificateAuthority, leaves: LeafContexts) -> None:
    server_ctx = await leaves.context_for(HOST)
    client = _client_ctx(ca)  # full verification: chain and name
    # The server refuses at the ClientHello, before the client could check a
    # name; its sni_mismatches count shows the refusal was the server's.
    # asyncio's SSL transport closes without flushing the alert, so the client
    # sees a reset; test_wrong_sni_sends_unrecognized_name checks the alert itself.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await _handshake(server_ctx, client, "evil.example.test")
    assert leaves.statistics()["sni_mismatches"] == 1


@pytest.mark.asyncio
async def test_wrong_sni_sends_unrecognized_name(ca: CertificateAuthority, leaves: LeafContexts) -> None:
    server_ctx = await leaves.context_for(HOST)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = _client_ctx(ca).wrap_bio(c_in, c_out, server_hostname="evil.example.test")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()  # ClientHello
    s_in.write(c_out.read())
    with pytest.raises(ssl.SSLError, match="CALLBACK_FAILED"):
        server.do_handshake()  # the SNI callback refuses
    c_in.write(s_out.read())  # the alert the server queued
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        client.do_handshake()
    assert leaves.statistics()["sni_mismatches"] == 1


@pytest.mark.asyncio
async def test_sni_compared_case_insensitively_without_root_dot(ca: CertificateAuthority, leaves: LeafContexts) -> None:
    server_ctx = await leaves.context_for(HOST)
    client = _client_ctx(ca)
    client.check_hostname = False  # the client's own matcher rejects the root dot
    assert await _handshake(server_ctx, client, "API.example.test.") == "http/1.1"
    assert leaves.statistics()["sni_mismatches"] == 0


@pytest.mark.asyncio
async def test_ip_literal_leaf_verifies_without_sni(ca: CertificateAuthority, leaves: LeafContexts) -> None:
    server_ctx = await leaves.context_for("127.0.0.1")
    # Python sends no SNI for an IP server_hostname and checks the IP SAN.
    assert await _handshake(server_ctx, _client_ctx(ca), "127.0.0.1") == "http/1.1"
    assert leaves.statistics()["sni_mismatches"] == 0


@pytest.mark.asyncio
async def test_long_host_verifies_strictly(ca: CertificateAuthority, leaves: LeafContexts) -> None:
    host = "a" * 60 + ".long.example.test"
    assert await _handshake(await leaves.context_for(host), _client_ctx(ca), host) == "http/1.1"


@pytest.mark.asyncio
async def test_concurrent_misses_mint_once(leaves: LeafContexts) -> None:
    contexts = await asyncio.gather(*(leaves.context_for("new.host") for _ in range(50)))
    assert all(ctx is contexts[0] for ctx in contexts)
    stats = leaves.statistics()
    assert (stats["mints"], stats["misses"], stats["hits"], stats["entries"]) == (1, 50, 0, 1)
    assert stats["mint_seconds_total"] > 0
    assert await leaves.context_for("NEW.host.") is contexts[0]
    assert leaves.statistics()["hits"] == 1
    assert repr(leaves) == "<LeafContexts entries=1/2048 hits=1 misses=50 in_flight=0>"


@pytest.mark.asyncio
async def test_cancelled_waiter_does_not_cancel_shared_mint(leaves: LeafContexts) -> None:
    first = asyncio.create_task(leaves.context_for("shared.example.test"))
    second = asyncio.create_task(leaves.context_for("shared.example.test"))
    await asyncio.sleep(0)
    first.cancel()
    assert isinstance(await second, ssl.SSLContext)
    assert first.cancelled()
    assert leaves.statistics()["mints"] == 1


@pytest.mark.asyncio
async def test_lru_eviction(ca: CertificateAuthority) -> None:
    leaves = LeafContexts(ca, max_entries=2)
    try:
        a = await leaves.context_for("a.test")
        await leaves.context_for("b.test")
        assert await leaves.context_for("a.test") is a  # a is now most recent
        await leaves.context_for("c.test")  # evicts b
        assert leaves.statistics()["entries"] == 2
        assert await leaves.context_for("a.test") is a
        assert leaves.statistics()["mints"] == 3
        await leaves.context_for("b.test")  # minted again
        assert leaves.statistics()["mints"] == 4
    finally:
        leaves.close()


@pytest.mark.asyncio
async def test_staging_dir_private_emptied_and_removed(leaves: LeafContexts) -> None:
    staging = leaves._tmpdir
    assert _mode(staging) == 0o700
    await leaves.context_for(HOST)
    assert list(staging.iterdir()) == []  # PEMs unlinked right after loading
    leaves.close()
    assert not staging.exists()
    with pytest.raises(RuntimeError):
        await leaves.context_for("after.close.test")


@pytest.mark.asyncio
async def test_invalid_host_fails_before_minting(leaves: LeafContexts) -> None:
    with pytest.raises(ValueError):
        await leaves.context_for("bad host")
    assert leaves.statistics()["mints"] == 0


# -- trust bundle -------------------------------------------------------------------
def _cert_blocks(data: bytes) -> list[bytes]:
    # Compare base64 bodies: some system roots (negative serials) make
    # cryptography warn when parsed.
    return [
        b"".join(m.split())
        for m in re.findall(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", data, re.DOTALL)
    ]


def test_bundle_has_system_certs_and_ca_once(
    ca: CertificateAuthority, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = tmp_path / "system.pem"
    others = [trustme.CA().cert_pem.bytes() for _ in range(2)]
    system.write_bytes(b"# a comment\n" + b"".join(others))
    monkeypatch.setattr(trust, "system_ca_file", lambda: system)
    out = trust.write_trust_bundle(ca.cert_path, tmp_path / "out" / "bundle.pem")
    first = out.read_bytes()
    ca_der = _cert_blocks(ca.cert_path.read_bytes())[0]
    assert _cert_blocks(first) == [*(_cert_blocks(o)[0] for o in others), ca_der]
    assert first.count(ca.cert_path.read_bytes().strip()) == 1
    assert _mode(out) == 0o644
    assert trust.write_trust_bundle(ca.cert_path, out).read_bytes() == first  # idempotent

    # A system bundle that already holds our CA (e.g. our own output) still yields it once.
    system.write_bytes(first)
    assert trust.write_trust_bundle(ca.cert_path, out).read_bytes() == first


def test_bundle_keeps_every_ca_of_a_rotation_file(
    ca: CertificateAuthority, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mid-rotation the CA file is the signing CA then the one still trusted:
    sidekey signs with the first, clients must trust both."""
    system = tmp_path / "system.pem"
    other = trustme.CA().cert_pem.bytes()
    system.write_bytes(trustme.CA().cert_pem.bytes() + other)  # a system store that already holds one of them
    monkeypatch.setattr(trust, "system_ca_file", lambda: system)
    rotation = tmp_path / "rotation" / "sidekey-ca.pem"
    rotation.parent.mkdir()
    rotation.write_bytes(ca.cert_path.read_bytes() + other + ca.cert_path.read_bytes())
    out = trust.write_trust_bundle(rotation, tmp_path / "bundle.pem").read_bytes()
    blocks = _cert_blocks(out)
    ca_der, other_der = _cert_blocks(ca.cert_path.read_bytes())[0], _cert_blocks(other)[0]
    assert blocks[-2:] == [ca_der, other_der]  # both, in the file's order, after the system's
    assert blocks.count(ca_der) == 1 and blocks.count(other_der) == 1
    assert len(blocks) == 3


def test_bundle_without_system_store_is_just_the_ca(
    ca: CertificateAuthority, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trust, "system_ca_file", lambda: None)
    out = trust.write_trust_bundle(ca.cert_path, tmp_path / "bundle.pem")
    assert _cert_blocks(out.read_bytes()) == _cert_blocks(ca.cert_path.read_bytes())


def test_bundle_from_real_system_store(ca: CertificateAuthority, tmp_path: Path) -> None:
    system = trust.system_ca_file()
    if system is None:
        pytest.skip("no system CA bundle on this machine")
    out = trust.write_trust_bundle(ca.cert_path, tmp_path / "bundle.pem")
    blocks = _cert_blocks(out.read_bytes())
    assert blocks[:-1] == _cert_blocks(system.read_bytes())  # a fresh CA is not in the system store
    assert blocks.count(_cert_blocks(ca.cert_path.read_bytes())[0]) == 1
    ssl.create_default_context(cafile=str(out))  # OpenSSL accepts the whole file


def test_system_ca_file_ignores_ssl_cert_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ours = tmp_path / "ours.pem"
    ours.write_bytes(b"")
    monkeypatch.setenv("SSL_CERT_FILE", str(ours))
    assert trust.system_ca_file() != ours


def test_trust_instructions(ca: CertificateAuthority) -> None:
    text = trust.trust_instructions(ca.cert_path)
    for needle in (
        str(ca.cert_path),
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "replaces",
        "sidekey ca --bundle",
        "NODE_EXTRA_CA_CERTS",
        "CURL_CA_BUNDLE",
        "--cacert",
        "HTTPS_PROXY=http://127.0.0.1:8080",
    ):
        assert needle in text


def test_normalize_host_is_the_cache_key() -> None:
    assert normalize_host("Example.COM.") == normalize_host("example.com") == "example.com"
    assert normalize_host("[::1]") == "::1"
