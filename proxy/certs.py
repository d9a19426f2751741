"""sidekey's own certificate authority, and the leaf certificates it mints.

The proxy answers ``CONNECT host:port`` and then terminates the client's TLS
itself, so it must present a certificate for ``host`` that the client trusts.
Clients trust sidekey's CA (``trust_instructions``); ``CertificateAuthority.mint_leaf``
makes a leaf per host, which ``proxy.leaf_contexts.LeafContexts`` mints on
first use and caches as a ready server ``ssl.SSLContext``.

Security properties kept here:
* the CA key is created 0600 with ``O_EXCL`` (never readable by others, even
  briefly) and refused if group/other may read it;
* key material never reaches a log, a ``repr`` or exception text: load errors
  name the path only and are raised ``from None``;
* certificates pass OpenSSL's X509_STRICT checks (the Python 3.13 default), so
  strict clients accept them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import os
import re
import shlex
import stat
import tempfile
from pathlib import Path
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT_NAME = "sidekey-ca.pem"
CA_KEY_NAME = "sidekey-ca-key.pem"
_CA_BACKDATE = dt.timedelta(hours=1)
_CA_LIFETIME = dt.timedelta(days=3650)
_LEAF_BACKDATE = dt.timedelta(days=1)  # clients whose clock runs behind ours
_LEAF_LIFETIME = dt.timedelta(days=365)
_CN_MAX = 64  # RFC 5280 ub-common-name; cryptography rejects longer CNs
# One DNS label: letters, digits, hyphen, and underscore (seen in real service
# names); no leading/trailing hyphen, 1..63 octets (RFC 1035 2.3.4).
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\r?\n?", re.DOTALL)

log = logging.getLogger("sidekey.certs")

_CAKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_IP: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


class CAError(ValueError):
    """The CA cannot be loaded or created. The text names paths and modes only
    (never key material), so the CLI prints it as the one line a person acts on."""


def _parse_ip(text: str) -> _IP | None:
    if "%" in text:  # a zone id is local to this machine, never a certificate name
        raise ValueError("scoped IPv6 addresses cannot be certificate names")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def normalize_host(host: str) -> str:
    """Canonical name for ``host`` (cache key and certificate name): compressed IP
    literals without brackets, or lower-case IDNA A-labels without the root dot.
    Raises ValueError, without echoing ``host``, when it cannot name a certificate."""
    if host.startswith("[") and host.endswith("]"):
        ip = _parse_ip(host[1:-1])
        if ip is None or ip.version != 6:
            raise ValueError("bracketed host is not an IPv6 literal")
        return str(ip)
    ip = _parse_ip(host)
    if ip is not None:
        return str(ip)
    name = host.removesuffix(".")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError("host is not a valid internationalized domain name") from None
    name = name.lower()
    if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise ValueError("host is not a valid DNS name")
    return name


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    # Readers see the old file or the new one, never a torn write.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _spki(cert_or_key: x509.Certificate | _CAKey) -> bytes:
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return cert_or_key.public_key().public_bytes(der, spki)


_KEY_USAGES = "digital_signature content_commitment key_encipherment data_encipherment key_agreement key_cert_sign"
_KEY_USAGES += " crl_sign encipher_only decipher_only"


def _key_usage(*usages: str) -> x509.KeyUsage:
    return x509.KeyUsage(**{flag: flag in usages for flag in _KEY_USAGES.split()})


def _key_pem(key: _CAKey | ec.EllipticCurvePrivateKey) -> bytes:
    pkcs8, plain = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, pkcs8, plain)


class CertificateAuthority:
    """sidekey's CA: loads or creates it, and signs leaf certificates."""

    __slots__ = ("_aki", "_ca_pem", "_cert", "_key", "_leaf_key", "_leaf_key_pem", "_leaf_ski", "cert_path", "key_path")

    def __init__(self, cert: x509.Certificate, key: _CAKey, cert_path: Path, key_path: Path) -> None:
        if _spki(key) != _spki(cert):
            raise CAError(f"{key_path} is not the key of {cert_path}")
        self.cert_path, self.key_path = cert_path, key_path
        self._cert, self._key = cert, key
        self._ca_pem = cert.public_bytes(serialization.Encoding.PEM)
        # One leaf key per CA instance, reused for every host (as mitmproxy
        # does): key generation would otherwise dominate the cost of a mint.
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = _key_pem(self._leaf_key)
        self._leaf_ski = x509.SubjectKeyIdentifier.from_public_key(self._leaf_key.public_key())
        try:
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())

    def __repr__(self) -> str:
        return (
            f"<CertificateAuthority {self._cert.subject.rfc4514_string()!r} "
            f"cert={str(self.cert_path)!r} until={self._cert.not_valid_after_utc:%Y-%m-%d}>"
        )

    @classmethod
    def load_or_create(cls, certs_dir: Path, *, common_name: str = "sidekey CA") -> CertificateAuthority:
        """Blocking: call through ``asyncio.to_thread``. Raises CAError (paths only)."""
        certs_dir = Path(certs_dir)
        try:
            return cls._load_or_create(certs_dir, common_name)
        except OSError as err:  # strerror is the OS's fixed text, never file content
            raise CAError(f"{err.filename or certs_dir}: cannot use the CA ({err.strerror})") from None

    @classmethod
    def import_from(cls, source_dir: Path, certs_dir: Path) -> CertificateAuthority:
        """Copy an existing CA (e.g. a mounted Kubernetes Secret, whose files are
        root-owned or group-readable) into ``certs_dir`` with the modes sidekey
        requires, and load it. Never creates a CA: a missing file is an error,
        since a fresh CA would be trusted by no client. Blocking; raises CAError
        (paths only)."""
        source_dir, certs_dir = Path(source_dir), Path(certs_dir)
        try:
            certs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            for name, mode in ((CA_CERT_NAME, 0o644), (CA_KEY_NAME, 0o600)):
                source = source_dir / name
                if not source.is_file():
                    raise CAError(f"{source} is missing: --from needs {CA_CERT_NAME} and {CA_KEY_NAME}")
                atomic_write(certs_dir / name, source.read_bytes(), mode)
            return cls._load(certs_dir / CA_CERT_NAME, certs_dir / CA_KEY_NAME)
        except OSError as err:
            raise CAError(f"{err.filename or source_dir}: cannot use the CA ({err.strerror})") from None

    @classmethod
    def _load_or_create(cls, certs_dir: Path, common_name: str) -> CertificateAuthority:
        certs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        cert_path, key_path = certs_dir / CA_CERT_NAME, certs_dir / CA_KEY_NAME
        have_cert, have_key = cert_path.exists(), key_path.exists()
        if have_cert and have_key:
            return cls._load(cert_path, key_path)
        if have_cert or have_key:
            present, missing = (cert_path, key_path) if have_cert else (key_path, cert_path)
            # Silently minting a new CA would break every client that trusts the old one.
            raise CAError(f"{missing} is missing but {present} exists: restore it, or remove both to create a new CA")
        return cls._create(cert_path, key_path, common_name)

    @classmethod
    def _load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        with key_path.open("rb") as f:
            # fstat the open file, so the mode checked is that of the bytes read.
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            if mode & 0o077:
                raise CAError(
                    f"CA key {key_path} is accessible by group or others (mode {mode:04o});"
                    f" run: chmod 600 {shlex.quote(str(key_path))}"
                )
            data = f.read()
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise CAError(f"{key_path} is not an unencrypted PEM private key") from None
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError:
            raise CAError(f"{cert_path} is not a PEM certificate") from None
        if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            return cls(cert, key, cert_path, key_path)
        raise CAError(f"{key_path}: only EC and RSA CA keys are supported")

    @classmethod
    def _create(cls, cert_path: Path, key_path: Path, common_name: str) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        cn, org = NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME
        name = x509.Name([x509.NameAttribute(cn, common_name), x509.NameAttribute(org, "sidekey")])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CA_BACKDATE)
            .not_valid_after(now + _CA_LIFETIME)
            # path_length=0: this CA signs leaves only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage("digital_signature", "key_cert_sign", "crl_sign"), critical=True)
            .add_extension(ski, critical=False)
            # Optional on a self-signed root (RFC 5280 4.2.1.1), but some
            # validators want it on every certificate.
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256())
        )
        # O_EXCL: never overwrite a key, and lose cleanly to a concurrent creator.
        # 0o600 at creation: the key is never readable by others, even briefly.
        fd = os.open(key_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(_key_pem(key))
            f.flush()
            os.fsync(f.fileno())
        atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        # Once, when made: clients must be told to trust this new CA ("sidekey ca" says how).
        log.info("created CA %s (clients must trust it: run 'sidekey ca')", cert_path)
        return cls(cert, key, cert_path, key_path)

    def fingerprints(self) -> tuple[str, str]:
        """SHA-256 of the certificate and of the key's public part (never the key itself)."""
        der = self._cert.public_bytes(serialization.Encoding.DER)
        return hashlib.sha256(der).hexdigest(), hashlib.sha256(_spki(self._key)).hexdigest()

    def mint_leaf(self, host: str) -> tuple[bytes, bytes]:
        """Return ``(leaf + CA certificate PEM, leaf key PEM)`` for ``host``."""
        name = normalize_host(host)
        ip = _parse_ip(name)
        san: x509.GeneralName = x509.IPAddress(ip) if ip is not None else x509.DNSName(name)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)] if len(name) <= _CN_MAX else [])
        now = dt.datetime.now(dt.UTC)
        not_after = min(now + _LEAF_LIFETIME, self._cert.not_valid_after_utc)
        if not_after <= now:
            raise ValueError(f"CA certificate {self.cert_path} has expired")
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _LEAF_BACKDATE)
            .not_valid_after(not_after)
            # RFC 5280 4.2.1.6: "If the subject field contains an empty sequence,
            # then the issuing CA MUST include a subjectAltName extension that is
            # marked as critical." (OpenSSL's strict mode checks it.)
            .add_extension(x509.SubjectAlternativeName([san]), critical=len(subject) == 0)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage("digital_signature"), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(self._aki, critical=False)
            .add_extension(self._leaf_ski, critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM) + self._ca_pem, self._leaf_key_pem
