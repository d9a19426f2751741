"""AWS SigV4 request signing for providers with ``auth: {type: aws-sigv4}``.

Two halves, like the credentials addon. The ``request`` hook removes what a
caller may have signed with (every ``X-Amz-*`` header; Authorization is gone
already) and makes sure the body can be hashed: a streamed body is held
whole up to the provider's ``retry.replay_max_bytes`` (at least 64 KiB, as
the exchange reads a body whole; then it can also be sent again on a retry) and refused above it with 413
``body_too_large_to_sign``, unless the provider allows ``unsigned_payload``.
The ``upstream_attempt`` hook signs every attempt afresh, last of all the
attempt hooks (``runs_last``): a retry gets a new X-Amz-Date, a failover is
signed for its own host, region and key, and no hook can change the request
after it was signed.

The key is three references of any source (read through the credentials
addon, so a store's value is cached and refreshed there) or, when the
policy names none, AWS's standard chain through aiobotocore (environment,
profile, container or instance role; temporary keys refreshed by it).

A policy without aws-sigv4 leaves both hooks idle: nothing is called.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict

from proxy.attempt import Attempt
from proxy.capabilities import SECRETS, Secrets
from proxy.credentials import sigv4
from proxy.errors import BodyTooLargeToSign, CredentialUnavailable
from proxy.flow import Flow, Response
from proxy.policy import Policy, Provider
from proxy.policy.credential_model import SigV4

if TYPE_CHECKING:
    from proxy.runtime import Runtime

log = logging.getLogger("sidekey.signing")


def strip_caller_signature(headers: CIMultiDict[str]) -> None:
    """Remove Authorization and every X-Amz-* header (a caller's own signature,
    date, token or payload hash); X-Amzn-* (Bedrock's options) stay."""
    for name in [n for n in headers if n.lower().startswith(sigv4.CALLER_PREFIX)]:
        headers.popall(name, None)
    headers.popall("authorization", None)


# proxy.responses.SMALL_BODY (addons do not import the session; a unit test
# holds the two equal): a Content-Length body up to it is read whole anyway.
SMALL_BODY = 65536


def hold_limit(provider: Provider) -> int:
    """The largest body held to be hashed: what the exchange reads whole for
    a Content-Length body of this provider (it can be retried), chunked ones too."""
    return max(SMALL_BODY, provider.retry.replay_max_bytes)


class AwsSigner:
    name = "signing"
    runs_last = ("upstream_attempt",)

    def __init__(self, secrets: Secrets | None = None) -> None:
        self._secrets = secrets
        self._signing = False  # some provider of the policy signs
        self._chain: Any = None  # aiobotocore's credentials from the standard chain, once resolved

    def setup(self, runtime: Runtime) -> None:
        if self._secrets is None:
            self._secrets = runtime.capability(SECRETS)

    async def configure(self, policy: Policy) -> None:
        signed = [p for p in policy.providers if p.auth.sigv4 is not None]
        self._signing = bool(signed)
        refs = [r for p in signed for r in p.auth.sigv4.refs()] if signed else []  # type: ignore[union-attr]
        if refs and self._secrets is not None:
            await self._secrets.ensure(refs)  # a start or reload reports what is missing
        for p in signed:
            assert p.auth.sigv4 is not None
            if p.auth.sigv4.default_chain:
                if self._chain is None:
                    self._chain = await _standard_chain()
                if self._chain is None:
                    log.warning("provider %s: no AWS credentials found by the standard chain", p.name)
            elif self._key(p.auth.sigv4) is None:
                log.warning("provider %s: the AWS key's credential sources are not all available", p.name)

    def idle_hooks(self) -> tuple[str, ...]:
        return () if self._signing else ("request", "upstream_attempt")

    # -- the request: once ----------------------------------------------------------
    def request(self, flow: Flow) -> Awaitable[None] | None:
        provider = flow.provider
        if provider is None or provider.auth.sigv4 is None:
            return None
        strip_caller_signature(flow.request.headers)
        body = flow.request.body
        if body is None or isinstance(body, bytes) or provider.auth.sigv4.unsigned_payload:
            return None
        limit = hold_limit(provider)
        length = flow.request.content_length
        if length is not None and length > limit:  # refused before a byte of it is read
            flow.response = Response.from_error(BodyTooLargeToSign(provider.name, limit=limit))
            return None
        return self._hold(flow, provider, limit)

    async def _hold(self, flow: Flow, provider: Provider, limit: int) -> None:
        """Read a streamed body whole, up to ``limit`` bytes: its hash is signed."""
        req = flow.request
        stream = req.body
        assert stream is not None and not isinstance(stream, bytes)
        pieces: list[bytes] = []
        size = 0
        async for piece in stream:
            size += len(piece)
            if size > limit:
                closing = getattr(stream, "aclose", None)
                if closing is not None:
                    await closing()
                flow.response = Response.from_error(BodyTooLargeToSign(provider.name, limit=limit))
                return
            pieces.append(piece)
        req.body = b"".join(pieces)
        req.content_length = size

    # -- every attempt: last ----------------------------------------------------------
    def upstream_attempt(self, flow: Flow, attempt: Attempt) -> Awaitable[None] | None:
        spec = attempt.provider.auth.sigv4
        if spec is None:
            return None
        if attempt.provider is not flow.provider:  # a fallback: the request hook ran for another provider
            strip_caller_signature(attempt.headers)
        body = attempt.body  # flow.request.body, or the attempt's own (placeholders put in)
        if body is not None and not isinstance(body, bytes) and not spec.unsigned_payload:
            raise BodyTooLargeToSign(attempt.provider.name, limit=hold_limit(attempt.provider))
        if spec.default_chain:
            return self._sign_from_chain(flow, attempt, spec)
        key = self._key(spec)
        if key is None:
            return self._sign_when_fetched(flow, attempt, spec)
        self._sign(flow, attempt, spec, key)
        return None

    def _key(self, spec: SigV4) -> sigv4.AwsKey | None:
        if self._secrets is None or spec.access_key_id is None or spec.secret_access_key is None:
            return None
        value = self._secrets.reference_value
        key_id, secret = value(spec.access_key_id), value(spec.secret_access_key)
        token = value(spec.session_token) if spec.session_token is not None else None
        if key_id is None or secret is None or (spec.session_token is not None and token is None):
            return None
        return sigv4.AwsKey(key_id, secret, token)

    async def _sign_when_fetched(self, flow: Flow, attempt: Attempt, spec: SigV4) -> None:
        """A key from a store not read yet: wait for its one fetch."""
        if self._secrets is not None:
            await self._secrets.ensure(list(spec.refs()))
        key = self._key(spec)
        if key is None:
            raise CredentialUnavailable(attempt.provider.name)
        self._sign(flow, attempt, spec, key)

    async def _sign_from_chain(self, flow: Flow, attempt: Attempt, spec: SigV4) -> None:
        if self._chain is None:
            self._chain = await _standard_chain()
        try:
            frozen = await self._chain.get_frozen_credentials() if self._chain is not None else None
        except Exception as exc:  # noqa: BLE001 - a role that cannot be refreshed: no key, 503
            log.warning("provider %s: the AWS credential chain failed: %s", attempt.provider.name, type(exc).__name__)
            frozen = None
        if frozen is None or not frozen.access_key or not frozen.secret_key:
            raise CredentialUnavailable(attempt.provider.name)
        self._sign(flow, attempt, spec, sigv4.AwsKey(frozen.access_key, frozen.secret_key, frozen.token or None))

    @staticmethod
    def _sign(flow: Flow, attempt: Attempt, spec: SigV4, key: sigv4.AwsKey) -> None:
        body = attempt.body  # what is sent: the hash signed must be of these bytes
        held = body if isinstance(body, bytes) else None
        unsigned = body is not None and held is None  # a stream, and the service takes UNSIGNED-PAYLOAD
        headers = attempt.headers
        signed = sigv4.sign(flow.request.method, attempt.url, headers.get("content-type"), held, unsigned, key,
                            spec.service, spec.region, datetime.now(UTC))  # fmt: skip
        for name, value in signed:
            headers[name] = value


async def _standard_chain() -> Any:
    """AWS's default credential chain (aiobotocore); None when it finds nothing."""
    try:
        from aiobotocore.session import get_session
    except ImportError:
        return None
    try:
        return await get_session().get_credentials()
    except Exception as exc:  # noqa: BLE001 - a broken profile or role: reported, not raised
        log.warning("the AWS credential chain failed: %s", type(exc).__name__)
        return None
