"""Policy readers for credentials: references to any source, the
``secret_stores:`` block and ``auth: {type: oauth2}``. Same conventions as
``proxy.policy.load``: every problem names file, line and field, and no
message ever repeats a value.
"""

from __future__ import annotations

import importlib.util
import re
from typing import cast
from urllib.parse import urlsplit

import yaml

from proxy.policy.credential_model import (
    AwsSmStore,
    AzureKvStore,
    OAuth2,
    SecretKind,
    SecretRef,
    SecretStores,
    SigV4,
    StaticRef,
    Timing,
    VaultAuth,
    VaultMethod,
    VaultStore,
)
from proxy.policy.fields import Invalid, Read, Reader, check_host

STORES = frozenset({"vault", "aws_sm", "azure_kv"})
TIMING = frozenset({"ttl", "stale_for"})
VAULT = frozenset({"address", "auth", "namespace", "ca_bundle"}) | TIMING
VAULT_AUTH: dict[str, frozenset[str]] = {
    "token": frozenset({"method", "token"}),
    "approle": frozenset({"method", "role_id", "secret_id", "mount"}),
    "kubernetes": frozenset({"method", "role", "jwt", "mount"}),
}
AWS_SM = frozenset({"region", "endpoint_url", "ca_bundle"}) | TIMING
AZURE_KV = frozenset({"vault_url", "ca_bundle"}) | TIMING
OAUTH2 = frozenset(
    {"type", "token_url", "client_id", "client_secret", "grant", "refresh_token", "scope", "audience", "auth_method",
     "ca_bundle"}
)  # fmt: skip
SIGV4 = frozenset({"type", "service", "region", "credentials", "unsigned_payload"})
SIGV4_KEY = frozenset({"access_key_id", "secret_access_key", "session_token"})
K8S_JWT = StaticRef("file", "/var/run/secrets/kubernetes.io/serviceaccount/token")
FORMS = (("env", "env:NAME"), ("file", "file:PATH"), ("vault", "vault:PATH#FIELD"), ("aws-sm", "aws-sm:NAME[#KEY]"),
         ("azure-kv", "azure-kv:NAME"))  # fmt: skip

# What each store accepts as a name, by its own documented rules.
_VAULT_PATH = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)+")  # mount/data/path
_FIELD = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_AWS_ID = re.compile(r"[A-Za-z0-9/_+=.@:\-]{1,2048}")  # a name or an ARN
_AZURE = re.compile(r"[0-9A-Za-z\-]{1,127}(/[0-9a-f]{32})?")  # name[/version]
_REGION = re.compile(r"[a-z]{2}(-[a-z0-9]+){1,4}")
_NAME = re.compile(r"[A-Za-z0-9_.\-@]{1,256}")
_SERVICE = re.compile(r"[a-z0-9][a-z0-9\-]{0,62}")  # a signing name: bedrock, s3, execute-api


def credential(r: Reader, node: yaml.Node, field: str) -> SecretRef:
    """A reference to where a credential lives; a store's kind only when that
    store is configured in ``secret_stores``."""
    forms = [form for k, form in FORMS if k in r.credential_kinds]
    expected = ", ".join(forms[:-1]) + " or " + forms[-1]
    kind, colon, rest = r.scalar(node, field, expected).partition(":")
    if kind in ("env", "file"):
        return r.secret(node, field)
    if not colon or kind not in ("vault", "aws-sm", "azure-kv"):
        raise r.problem(node, field, f"expected {expected}; literal secrets are not allowed")
    if kind not in r.credential_kinds:
        raise r.problem(node, field, f"{kind}: references need secret_stores.{kind.replace('-', '_')}")
    ref, _, key = rest.partition("#")
    if kind == "vault" and not (_VAULT_PATH.fullmatch(ref) and _FIELD.fullmatch(key)):
        raise r.problem(node, field, "expected vault:MOUNT/data/PATH#FIELD (KV version 2)")
    if kind == "aws-sm" and not (_AWS_ID.fullmatch(ref) and (not key or _FIELD.fullmatch(key))):
        raise r.problem(node, field, "expected aws-sm:NAME-OR-ARN or aws-sm:NAME-OR-ARN#JSON_KEY")
    if kind == "azure-kv" and (key or not _AZURE.fullmatch(ref)):
        raise r.problem(node, field, "expected azure-kv:NAME or azure-kv:NAME/VERSION")
    return SecretRef(cast(SecretKind, kind), ref, key)


def _static(r: Reader, node: yaml.Node, field: str) -> StaticRef:
    ref = r.secret(node, field)
    return StaticRef("env" if ref.kind == "env" else "file", ref.ref)


def _https_url(r: Reader, node: yaml.Node, field: str, *, path_ok: bool) -> str:
    value = r.string(node, field).strip()
    what = "an https URL" + (" (https://host[:port]/path)" if path_ok else " (https://host[:port], no path)")
    try:
        url = urlsplit(value)
        url.port  # noqa: B018 - ValueError unless a number in range
    except ValueError:
        raise r.problem(node, field, f"expected {what}") from None
    if url.scheme != "https":
        raise r.problem(node, field, "must be https: credentials are never sent over plaintext")
    if "@" in url.netloc or url.query or url.fragment or check_host(url.hostname or "", wildcard=False) is None:
        raise r.problem(node, field, f"expected {what}, without user info, query or fragment")
    if not path_ok and url.path not in ("", "/"):
        raise r.problem(node, field, f"expected {what}")
    return value.rstrip("/") if not path_ok else value


def _timing(r: Reader, f: dict[str, yaml.Node], field: str) -> Timing:
    d = Timing()
    return Timing(
        ttl=r.opt(f, field, "ttl", r.duration, d.ttl),
        stale_for=r.opt(f, field, "stale_for", lambda n, w: r.duration(n, w, zero_ok=True), d.stale_for),
    )


def secret_stores(r: Reader, node: yaml.Node, field: str) -> SecretStores:
    f = r.mapping(node, field, STORES)
    return SecretStores(
        vault=r.opt(f, field, "vault", lambda n, w: _vault(r, n, w), None, null_ok=True),
        aws_sm=r.opt(f, field, "aws_sm", lambda n, w: _aws_sm(r, n, w), None, null_ok=True),
        azure_kv=r.opt(f, field, "azure_kv", lambda n, w: _azure_kv(r, n, w), None, null_ok=True),
    )


def _vault(r: Reader, node: yaml.Node, field: str) -> VaultStore:
    f = r.mapping(node, field, VAULT)
    for key in ("address", "auth"):
        if key not in f:
            r.problem(node, f"{field}.{key}", "required")
    address = r.opt(f, field, "address", lambda n, w: _https_url(r, n, w, path_ok=False), "")
    auth = r.opt(f, field, "auth", lambda n, w: _vault_auth(r, n, w), None)
    namespace = r.opt(f, field, "namespace", r.string, "")
    ca = r.opt(f, field, "ca_bundle", r.ca_bundle, None, null_ok=True)
    timing = _timing(r, f, field)
    if not address or auth is None:
        raise r.problem(node, field, "is incomplete (see the problems above)")
    return VaultStore(address, auth, namespace, ca, timing)


def _vault_auth(r: Reader, node: yaml.Node, field: str) -> VaultAuth:
    f = r.mapping(node, field, frozenset().union(*VAULT_AUTH.values()))
    if "method" not in f:
        raise r.problem(node, f"{field}.method", "required: one of token, approle, kubernetes")
    method = cast(VaultMethod, r.choice(f["method"], f"{field}.method", tuple(VAULT_AUTH)))
    for key in f.keys() - VAULT_AUTH[method]:
        r.problem(f[key], f"{field}.{key}", f"does not apply to method {method}")
    needs = {"token": ("token",), "approle": ("role_id", "secret_id"), "kubernetes": ("role",)}[method]
    for key in needs:
        if key not in f:
            r.problem(node, f"{field}.{key}", f"required for method {method}")

    name = r.matching(_NAME, "a name", "expected a name of A-Z, a-z, 0-9, '_', '.', '-', '@'")

    return VaultAuth(
        method=method,
        token=r.opt(f, field, "token", lambda n, w: _static(r, n, w), None),
        role_id=r.opt(f, field, "role_id", name, ""),
        secret_id=r.opt(f, field, "secret_id", lambda n, w: _static(r, n, w), None),
        role=r.opt(f, field, "role", name, ""),
        jwt=r.opt(f, field, "jwt", lambda n, w: _static(r, n, w), K8S_JWT if method == "kubernetes" else None),
        mount=r.opt(f, field, "mount", name, "" if method == "token" else method),
    )


def _aws_sm(r: Reader, node: yaml.Node, field: str) -> AwsSmStore:
    f = r.mapping(node, field, AWS_SM)

    return AwsSmStore(
        region=r.opt(f, field, "region", _region(r), None),
        endpoint_url=r.opt(f, field, "endpoint_url", lambda n, w: _https_url(r, n, w, path_ok=False), None),
        ca_bundle=r.opt(f, field, "ca_bundle", r.ca_bundle, None, null_ok=True),
        timing=_timing(r, f, field),
    )


def _azure_kv(r: Reader, node: yaml.Node, field: str) -> AzureKvStore:
    f = r.mapping(node, field, AZURE_KV)
    if "vault_url" not in f:
        raise r.problem(node, f"{field}.vault_url", "required: https://NAME.vault.azure.net")
    return AzureKvStore(
        vault_url=_https_url(r, f["vault_url"], f"{field}.vault_url", path_ok=False),
        ca_bundle=r.opt(f, field, "ca_bundle", r.ca_bundle, None, null_ok=True),
        timing=_timing(r, f, field),
    )


def oauth2(r: Reader, f: dict[str, yaml.Node], node: yaml.Node, field: str) -> OAuth2:
    """The oauth2 fields of an ``auth`` mapping (``type`` already read)."""
    grant = r.opt(f, field, "grant", lambda n, w: r.choice(n, w, ("client_credentials", "refresh_token")),
                  "client_credentials")  # fmt: skip
    needs = ("token_url", "client_id") + (("client_secret",) if grant == "client_credentials" else ("refresh_token",))
    for key in needs:
        if key not in f:
            r.problem(node, f"{field}.{key}", f"required for grant {grant}")
    if grant == "client_credentials" and "refresh_token" in f:
        r.problem(f["refresh_token"], f"{field}.refresh_token", "applies to grant refresh_token only")
    ref = lambda n, w: credential(r, n, w)  # noqa: E731
    method = r.opt(f, field, "auth_method", lambda n, w: r.choice(n, w, ("basic", "post")), "basic")
    return OAuth2(
        token_url=r.opt(f, field, "token_url", lambda n, w: _https_url(r, n, w, path_ok=True), ""),
        client_id=r.opt(f, field, "client_id", r.string, ""),
        client_secret=r.opt(f, field, "client_secret", ref, None),
        grant="refresh_token" if grant == "refresh_token" else "client_credentials",
        refresh_token=r.opt(f, field, "refresh_token", ref, None),
        scope=r.opt(f, field, "scope", r.string, ""),
        audience=r.opt(f, field, "audience", r.string, ""),
        auth_method="post" if method == "post" else "basic",
        ca_bundle=r.opt(f, field, "ca_bundle", r.ca_bundle, None, null_ok=True),
    )


def sigv4(r: Reader, f: dict[str, yaml.Node], node: yaml.Node, field: str) -> SigV4:
    """The aws-sigv4 fields of an ``auth`` mapping (``type`` already read).
    ``credentials``: ``default`` (AWS's standard chain; also when absent) or
    ``{access_key_id, secret_access_key, session_token}``, each a reference."""
    for key in ("service", "region"):
        if key not in f:
            r.problem(node, f"{field}.{key}", "required for type aws-sigv4")
    if importlib.util.find_spec("botocore") is None:  # signs with botocore; not imported here
        r.problem(f["type"], f"{field}.type", "aws-sigv4 needs the aws extra (pip install 'sidekey[aws]')")

    service = r.matching(_SERVICE, "an AWS signing name", "expected an AWS signing name such as bedrock or s3")
    keys = _sigv4_keys(r, f.get("credentials"), f"{field}.credentials")
    return SigV4(
        service=r.opt(f, field, "service", service, ""),
        region=r.opt(f, field, "region", _region(r), ""),
        access_key_id=keys[0],
        secret_access_key=keys[1],
        session_token=keys[2],
        unsigned_payload=r.opt(f, field, "unsigned_payload", r.flag, False),
    )


def _sigv4_keys(r: Reader, cred: yaml.Node | None, where: str) -> tuple[SecretRef | None, ...]:
    """(access_key_id, secret_access_key, session_token); all None: the AWS chain."""
    if cred is None:
        return (None, None, None)
    if isinstance(cred, yaml.ScalarNode):
        if r.scalar(cred, where, "default or a mapping") != "default":
            r.problem(cred, where, "expected default (the AWS chain) or {access_key_id, secret_access_key, "
                      "session_token}; literal secrets are not allowed")  # fmt: skip
        return (None, None, None)
    try:
        c = r.mapping(cred, where, SIGV4_KEY)
    except Invalid:
        return (None, None, None)
    for key in ("access_key_id", "secret_access_key"):
        if key not in c:
            r.problem(cred, f"{where}.{key}", "required unless credentials is default")
    ref = lambda n, w: credential(r, n, w)  # noqa: E731
    return tuple(r.opt(c, where, key, ref, None) for key in ("access_key_id", "secret_access_key", "session_token"))


def _region(r: Reader) -> Read[str]:
    """An AWS region (a secret store's, a signer's)."""
    return r.matching(_REGION, "an AWS region", "expected an AWS region such as us-east-1")
