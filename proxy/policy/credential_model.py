"""The policy's credential types: a reference to where a secret lives
(``SecretRef``), the parsed ``secret_stores:`` block and ``auth: {type:
oauth2}``, and how a fetched value is kept (``Timing``). Frozen dataclasses, no
I/O (read by ``proxy.policy.credentials``; used by ``proxy.credentials``, which
fetches, so the policy never imports the fetching side).

A reference names its store by kind (``vault:``, ``aws-sm:``, ``azure-kv:``);
each kind has one store here, with its address, its own authentication
(itself a static reference: ``env:`` or ``file:``) and its timing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SecretKind = Literal["env", "file", "vault", "aws-sm", "azure-kv", "oauth2"]
VaultMethod = Literal["token", "approle", "kubernetes"]


@dataclass(frozen=True, slots=True)
class SecretRef:
    """Where a secret lives. Only ``source`` is ever shown (logs, admin API)."""

    kind: SecretKind
    ref: str  # variable name, file path, store path or secret name; an oauth2 provider's name
    key: str = ""  # a field of a structured secret (vault: KV field; aws-sm: JSON key)

    @property
    def source(self) -> str:
        return f"{self.kind}:{self.ref}#{self.key}" if self.key else f"{self.kind}:{self.ref}"

    def __repr__(self) -> str:
        return f"SecretRef({self.source!r})"


@dataclass(frozen=True, slots=True)
class Timing:
    """How a cached credential is kept.

    ttl: re-read this long after the last good read (stores).
    stale_for: serve the last good value this much longer while re-reads fail.
    follow_expiry: the value carries its own lifetime (OAuth2): refresh at half
    of it (see EXPIRY_MARGIN), and serve it until expiry.
    """

    ttl: float = 300.0
    stale_for: float = 3600.0
    follow_expiry: bool = False


@dataclass(frozen=True, slots=True)
class StaticRef:
    """An ``env:`` or ``file:`` reference used to reach a store (the store's
    own token, AppRole secret_id, service-account JWT)."""

    kind: Literal["env", "file"]
    ref: str

    @property
    def source(self) -> str:
        return f"{self.kind}:{self.ref}"


@dataclass(frozen=True, slots=True)
class VaultAuth:
    method: VaultMethod
    token: StaticRef | None = None  # method token
    role_id: str = ""  # method approle (not a secret: it names the role)
    secret_id: StaticRef | None = None  # method approle
    role: str = ""  # method kubernetes
    jwt: StaticRef | None = None  # method kubernetes (default: the pod's service-account token)
    mount: str = ""  # the auth method's mount path ("approle", "kubernetes" by default)


@dataclass(frozen=True, slots=True)
class VaultStore:
    address: str  # https://host:port, no path
    auth: VaultAuth
    namespace: str = ""  # Vault Enterprise / HCP namespace (X-Vault-Namespace)
    ca_bundle: str | None = None  # extra CA file, added to the system store
    timing: Timing = field(default_factory=Timing)


@dataclass(frozen=True, slots=True)
class AwsSmStore:
    region: str | None = None  # None: from the standard chain (AWS_REGION, profile)
    endpoint_url: str | None = None  # a VPC endpoint; None: the region's public one
    ca_bundle: str | None = None
    timing: Timing = field(default_factory=Timing)


@dataclass(frozen=True, slots=True)
class AzureKvStore:
    vault_url: str  # https://NAME.vault.azure.net
    ca_bundle: str | None = None
    timing: Timing = field(default_factory=Timing)


@dataclass(frozen=True, slots=True)
class SecretStores:
    vault: VaultStore | None = None
    aws_sm: AwsSmStore | None = None
    azure_kv: AzureKvStore | None = None

    def configured(self) -> frozenset[str]:
        """The reference kinds these stores serve."""
        kinds = {"env", "file", "oauth2"}
        if self.vault is not None:
            kinds.add("vault")
        if self.aws_sm is not None:
            kinds.add("aws-sm")
        if self.azure_kv is not None:
            kinds.add("azure-kv")
        return frozenset(kinds)


@dataclass(frozen=True, slots=True)
class OAuth2:
    """``auth: {type: oauth2}``: an access token from ``token_url``, sent as
    ``Authorization: Bearer``. ``client_secret`` and ``refresh_token`` are
    references of any source."""

    token_url: str
    client_id: str
    client_secret: SecretRef | None  # None: a public client (refresh_token grant)
    grant: Literal["client_credentials", "refresh_token"] = "client_credentials"
    refresh_token: SecretRef | None = None  # grant refresh_token
    scope: str = ""
    audience: str = ""
    auth_method: Literal["basic", "post"] = "basic"  # client_secret_basic / client_secret_post (RFC 6749 2.3.1)
    ca_bundle: str | None = None  # for the token endpoint; else the provider's tls.ca_bundle


@dataclass(frozen=True, slots=True)
class SigV4:
    """``auth: {type: aws-sigv4}``: every attempt signed with AWS Signature
    Version 4 (``proxy.credentials.sigv4``, ``addons.signing``). The key comes
    from three references of any source, or (all None) from AWS's standard
    chain: environment, profile, container or instance role."""

    service: str  # the signing name: bedrock, s3, execute-api, ...
    region: str
    access_key_id: SecretRef | None = None
    secret_access_key: SecretRef | None = None
    session_token: SecretRef | None = None  # temporary credentials only
    # A body too large to hold (or sent chunked) goes as UNSIGNED-PAYLOAD
    # instead of being buffered up to retry.replay_max_bytes: only for
    # services that accept it (S3 and its look-alikes).
    unsigned_payload: bool = False

    @property
    def default_chain(self) -> bool:
        return self.access_key_id is None

    def refs(self) -> tuple[SecretRef, ...]:
        """The references this key is read from (none: the standard chain)."""
        return tuple(r for r in (self.access_key_id, self.secret_access_key, self.session_token) if r is not None)
