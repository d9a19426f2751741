"""AWS Signature Version 4 for one request: the pure part (no I/O; the
addon ``addons.signing`` does the rest).

The signature itself is botocore's (``SigV4Auth``; ``S3SigV4Auth`` for s3,
which does not encode the path twice): the steps it documents
(``canonical_request``, ``string_to_sign``, ``signature``) are called with a
timestamp we pass, so a signature is a function of its inputs and checked
against AWS's published test vector. botocore comes with the ``aws`` extra
(``pip install 'sidekey[aws]'``); a policy with ``type: aws-sigv4`` is refused
at load time without it.

What is signed is only what sidekey sets and nothing on the way changes:
``host`` (from the URL, as aiohttp sends it), ``x-amz-date``,
``x-amz-content-sha256`` (unsigned payloads and s3), ``x-amz-security-token``
when the key is temporary, and the caller's ``content-type``. Any other header may be added or
rewritten after us without breaking the signature.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
TIMESTAMP = "%Y%m%dT%H%M%SZ"
# Headers a caller may send that would be taken for part of our signature:
# every X-Amz-* (not X-Amzn-*: Bedrock's own request options) and Authorization.
CALLER_PREFIX = "x-amz-"


@dataclass(frozen=True, slots=True)
class AwsKey:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    def __repr__(self) -> str:  # never the secret or the token
        return f"AwsKey({self.access_key_id[:4]}...)"


def payload_hash(body: bytes | None) -> str:
    return hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256


def sign(method: str, url: str, content_type: str | None, body: bytes | None, unsigned: bool, key: AwsKey,
         service: str, region: str, now: datetime) -> list[tuple[str, str]]:  # fmt: skip
    """The headers that sign this request: Authorization, X-Amz-Date,
    X-Amz-Security-Token for a temporary key, and X-Amz-Content-SHA256 when
    the payload is ``unsigned`` (``UNSIGNED-PAYLOAD``) or the service is s3
    (which requires it). The body's hash is signed unless ``unsigned``.
    ``url`` is exactly as sent (its path already percent-encoded)."""
    from botocore.auth import S3SigV4Auth, SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    timestamp = now.astimezone(UTC).strftime(TIMESTAMP)
    headers = [("X-Amz-Date", timestamp)]
    if unsigned or service == "s3":
        headers.append(("X-Amz-Content-SHA256", UNSIGNED_PAYLOAD if unsigned else payload_hash(body)))
    if key.session_token:
        headers.append(("X-Amz-Security-Token", key.session_token))
    signed = dict(headers)
    if content_type is not None:
        signed["Content-Type"] = content_type
    request = AWSRequest(method=method, url=url, headers=signed, data=body or b"")
    request.context["timestamp"] = timestamp
    signer = (S3SigV4Auth if service == "s3" else SigV4Auth)(
        Credentials(key.access_key_id, key.secret_access_key, key.session_token), service, region
    )
    canonical = signer.canonical_request(request)
    signature = signer.signature(signer.string_to_sign(request, canonical), request)
    names = signer.signed_headers(signer.headers_to_sign(request))
    authorization = f"AWS4-HMAC-SHA256 Credential={signer.scope(request)}, SignedHeaders={names}, Signature={signature}"
    return [("Authorization", authorization), *headers]
