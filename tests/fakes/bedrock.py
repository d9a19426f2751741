"""A fake AWS service over TLS that checks every request's Signature
Version 4 as AWS does, and answers like Bedrock runtime.

Verification (``SigV4Check.verify``) starts from the request as received:
the Authorization header's scope (key, date, region, service) and signed
header list, X-Amz-Date within 5 minutes, the session token for a temporary
key, the body's SHA-256 against X-Amz-Content-SHA256 (UNSIGNED-PAYLOAD only
where the service allows it). Then the signature is computed again with
botocore's own signer (``SigV4Auth``; ``S3SigV4Auth`` for s3) over the
method, the path and query as received, the signed headers' received values
and the received body, and compared. A request that fails any of it gets
403 with AWS's error shape (``x-amzn-ErrorType``).

Routes: Bedrock's ``POST /model/{id}/invoke`` (JSON) and
``/model/{id}/invoke-with-response-stream`` (``application/vnd.amazon.eventstream``
frames, the second and later held until ``release_stream()``), and any other
path answered 200 with the byte count (an s3-like PUT).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import calendar
import hashlib
import hmac
import json
import re
import struct
import time
from dataclasses import dataclass

from aiohttp import web
from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.fakes.stores import StoreThread

_AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request, "
    r"SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=(?P<signature>[0-9a-f]{64})"
)
UNSIGNED = "UNSIGNED-PAYLOAD"


@dataclass
class Seen:
    """One request as the fake received it, and its verdict."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names; repeated ones joined
    body_length: int
    problem: str | None  # None: the signature held

    @property
    def amz_date(self) -> str:
        return self.headers.get("x-amz-date", "")


def event_frame(payload: bytes, event_type: str = "chunk") -> bytes:
    """One message of AWS's event stream encoding (prelude, string headers,
    payload, CRC32s), as Bedrock sends them."""
    headers = {":event-type": event_type, ":content-type": "application/json", ":message-type": "event"}
    encoded = b"".join(
        bytes([len(k)]) + k.encode() + b"\x07" + struct.pack(">H", len(v)) + v.encode() for k, v in headers.items()
    )
    prelude = struct.pack(">II", 16 + len(encoded) + len(payload), len(encoded))
    message = prelude + struct.pack(">I", binascii.crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", binascii.crc32(message))


class FakeBedrock(StoreThread):
    def __init__(self, keys: dict[str, str], *, region: str = "us-east-1", service: str = "bedrock",
                 tokens: dict[str, str] | None = None, allow_unsigned: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.keys = keys  # access key id -> secret access key
        self.tokens = tokens or {}  # access key id -> the session token it must come with
        self.region, self.service, self.allow_unsigned = region, service, allow_unsigned
        self.fail_next = 0  # answer this many correctly signed requests 503 (Retry-After: 1) first
        self.seen: list[Seen] = []
        self.stream_chunks = [b'{"type":"content_block_delta","delta":{"text":"Hel"}}', b'{"delta":{"text":"lo"}}']
        self._gate = asyncio.Event()

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self._handle)

    def release_stream(self) -> None:
        self._loop.call_soon_threadsafe(self._gate.set)

    def verify(self, request: web.Request, body: bytes) -> str | None:
        """Why the signature does not hold, or None."""
        m = _AUTH.fullmatch(request.headers.get("Authorization", ""))
        if m is None:
            return "missing or malformed Authorization"
        key, date = m["key"], request.headers.get("X-Amz-Date", "")
        if key not in self.keys:
            return "unknown access key"
        if (m["region"], m["service"]) != (self.region, self.service):
            return "wrong credential scope"
        try:
            stamp = calendar.timegm(time.strptime(date, "%Y%m%dT%H%M%SZ"))
        except ValueError:
            return "bad X-Amz-Date"
        if m["date"] != date[:8] or abs(time.time() - stamp) > 300:
            return "request time too skewed"
        signed = m["signed"].split(";")
        if "host" not in signed or "x-amz-date" not in signed:
            return "host and x-amz-date must be signed"
        token = self.tokens.get(key)
        if token is not None and (request.headers.get("X-Amz-Security-Token") != token
                                  or "x-amz-security-token" not in signed):  # fmt: skip
            return "security token invalid"
        payload = request.headers.get("X-Amz-Content-SHA256")
        if payload == UNSIGNED and not self.allow_unsigned:
            return "unsigned payload not allowed"
        if payload not in (None, UNSIGNED) and payload != hashlib.sha256(body).hexdigest():
            return "content hash mismatch"
        if any(name not in request.headers for name in signed):
            return "a signed header is missing"
        headers = {name: ",".join(request.headers.getall(name)) for name in signed}
        aws = AWSRequest(method=request.method, url=f"https://{request.host}{request.raw_path}", headers=headers,
                         data=body)  # fmt: skip
        aws.context["timestamp"] = date
        signer = (S3SigV4Auth if self.service == "s3" else SigV4Auth)(
            Credentials(key, self.keys[key], token), self.service, self.region
        )
        expected = signer.signature(signer.string_to_sign(aws, signer.canonical_request(aws)), aws)
        return None if hmac.compare_digest(expected, m["signature"]) else "signature mismatch"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        problem = self.verify(request, body)
        headers = {k.lower(): ",".join(request.headers.getall(k)) for k in request.headers}
        self.seen.append(Seen(request.method, request.raw_path, headers, len(body), problem))
        if problem is not None:
            return web.json_response({"message": f"The request signature we calculated does not match ({problem})"},
                                     status=403, headers={"x-amzn-ErrorType": "InvalidSignatureException"})  # fmt: skip
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.json_response({"message": "ServiceUnavailable"}, status=503, headers={"Retry-After": "1"})
        if request.path.endswith("/invoke-with-response-stream"):
            return await self._stream(request)
        if request.path.endswith("/invoke"):
            return web.json_response({"id": "msg_fake", "type": "message", "role": "assistant",
                                      "content": [{"type": "text", "text": "Hello"}],
                                      "usage": {"input_tokens": 3, "output_tokens": 1}})  # fmt: skip
        return web.json_response({"received": len(body)})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/vnd.amazon.eventstream"})
        await resp.prepare(request)
        for i, chunk in enumerate(self.stream_chunks):
            if i == 1:
                await self._gate.wait()  # the caller must have the first frame before the second exists
            await resp.write(event_frame(json.dumps({"bytes": base64.b64encode(chunk).decode()}).encode()))
        await resp.write_eof()
        return resp
