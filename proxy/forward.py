"""The forwarder: one request's attempts against its upstream, under one
deadline. The decisions (retry or not, how long to wait) are ``proxy.retry``'s;
this file only does the I/O between them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import TYPE_CHECKING

from aiohttp import ClientResponse
from yarl import URL

from proxy import errors, retry, upstream
from proxy.bodies import BodyReader
from proxy.flow import Flow
from proxy.policy import RetryPolicy

if TYPE_CHECKING:
    from proxy.engine import Sidekey

log = logging.getLogger("sidekey.forward")

NO_RETRY = RetryPolicy(attempts=1)
MAX_RETRIES_OVERRIDE = 10


def with_overrides(policy: RetryPolicy, retries: str | None, timeout: str | None) -> RetryPolicy:
    """``x-sidekey-retries: N`` (0..10 retries) and ``x-sidekey-timeout: S``
    (the retry deadline, seconds) from the caller; malformed values are ignored."""
    changes: dict[str, object] = {}
    if retries is not None and retries.strip().isdigit():
        changes["attempts"] = min(int(retries), MAX_RETRIES_OVERRIDE) + 1
    if timeout is not None:
        try:
            seconds = float(timeout)
        except ValueError:
            seconds = -1.0
        if 0 < seconds <= 3600:
            changes["deadline"] = seconds
    return dataclasses.replace(policy, **changes) if changes else policy  # type: ignore[arg-type]


async def forward(engine: Sidekey, flow: Flow, body: BodyReader) -> ClientResponse:
    """Send flow.request upstream, retrying as the provider's policy allows.
    Returns the response whose headers are in; raises the last ProxyError."""
    provider = flow.provider
    policy = provider.retry if provider is not None else NO_RETRY
    headers = flow.request.headers
    if "x-sidekey-retries" in headers or "x-sidekey-timeout" in headers:
        policy = with_overrides(policy, headers.pop("x-sidekey-retries", None), headers.pop("x-sidekey-timeout", None))
    # A streamed body is gone once sent; only a body held as bytes can go again.
    replayable = body.kind == "none" or isinstance(flow.request.body, bytes)
    method = flow.request.method
    attempt = 0
    while True:
        attempt += 1
        try:
            resp = await _attempt(engine, flow, body)
        except errors.ProxyError as err:
            if body.error is not None:  # the caller's body broke: that is the cause
                raise body.error from None
            decision = retry.decide(
                policy, attempts_made=attempt, method=method, replayable=replayable, elapsed=_elapsed(flow),
                error_code=err.code, rand=engine.random,
            )  # fmt: skip
            if not decision.retry:
                _note_attempts(flow, attempt)
                raise
        else:
            if resp.status < 400 or resp.status not in policy.statuses:
                _note_attempts(flow, attempt)
                return resp
            asked = retry.server_delay(resp.headers, time.time())
            decision = retry.decide(
                policy, attempts_made=attempt, method=method, replayable=replayable, elapsed=_elapsed(flow),
                status=resp.status, asked_delay=asked, rand=engine.random,
            )  # fmt: skip
            if not decision.retry:
                _note_attempts(flow, attempt)
                return resp
            resp.release()  # the failed answer is not the caller's
        log.debug("flow %s: attempt %d failed, retrying in %.3fs", flow.id, attempt, decision.delay)
        await engine.sleep(decision.delay)


def _elapsed(flow: Flow) -> float:
    """Seconds since the request arrived, the failed attempt included (only
    read on the failure path: the deadline is about when a retry would start)."""
    return time.monotonic() - flow.timings["start"]


def _note_attempts(flow: Flow, attempts: int) -> None:
    if attempts > 1:  # the common case leaves metadata empty (audit's fast path)
        flow.metadata["attempts"] = attempts


async def _attempt(engine: Sidekey, flow: Flow, body: BodyReader) -> ClientResponse:
    assert flow.upstream_url is not None, "route() sets it"
    url = URL(flow.upstream_url, encoded=True)
    provider = flow.provider
    key = upstream.pool_key(provider, url.scheme, url.raw_host or "", url.port or 443, engine.guard)
    session = engine.pools.session(key)  # raises AddressBlocked for a metadata IP literal
    breaker = engine.breaker(provider, key.host, key.port) if provider is not None else None
    now = time.monotonic()
    if breaker is not None and not breaker.allow(now):
        raise errors.CircuitOpen(flow.provider_name, seconds=math.ceil(breaker.retry_after(now)) or 1)
    flow.timings["request_sent"] = now
    server_name = provider.tls.server_name if provider else None
    try:
        resp = await upstream.send(session, flow, url, engine.pools.timeout(provider), server_name)
    except errors.ProxyError:
        if breaker is not None:
            breaker.record(True, time.monotonic())
        raise
    except BaseException:
        if breaker is not None:
            breaker.abandon()
        raise
    flow.timings["response_headers"] = end = time.monotonic()
    if breaker is not None:
        failed = resp.status >= 500 or resp.status == 429
        asked = retry.server_delay(resp.headers, time.time()) if failed else None
        breaker.record(failed, end, asked)
    return resp
