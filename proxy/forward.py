"""The forwarder: one request's attempts across the members of its provider's
upstream group and then its fallbacks, under one deadline. The decisions are
pure code elsewhere (``proxy.retry``: retry or not and how long to wait;
``proxy.balance``: which member; ``proxy.failover``: what a fallback request
looks like); this file does the I/O between them and injects the credential
on every attempt, so each member and each fallback gets its own key.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import TYPE_CHECKING, cast

from aiohttp import ClientResponse, ClientSession
from multidict import CIMultiDict
from yarl import URL

from proxy import balance, errors, failover, retry, routing, upstream, ws_upstream
from proxy.balance import UpstreamState
from proxy.bodies import BodyReader
from proxy.flow import Flow
from proxy.policy import Provider, RetryPolicy

if TYPE_CHECKING:
    from proxy.engine import Sidekey

log = logging.getLogger("sidekey.forward")

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


@dataclasses.dataclass(slots=True)
class Route:
    """The provider the attempts currently go to: the matched one, then fallbacks."""

    provider: Provider
    policy: RetryPolicy
    url: str | None  # the matched provider's URL for members without their own (addons may rewrite it)
    parsed: URL | None  # ``url`` parsed once
    host: str  # where members without their own URL go
    port: int
    path: str = ""  # fallbacks: the rewritten origin-form path
    body: bytes | None = None  # fallbacks: the rewritten body, when the model changed
    next_fallback: int = 0


async def forward(engine: Sidekey, flow: Flow, body: BodyReader) -> ClientResponse:
    """Send flow.request upstream, retrying and failing over as the policy
    allows. Returns the response whose headers are in; raises the last error."""
    assert flow.upstream_url is not None, "route() sets it"
    provider = flow.provider
    if provider is None:  # unmatched plain-HTTP passthrough: one attempt, no credential
        return await _send(engine, flow, None, URL(flow.upstream_url, encoded=True))
    policy = provider.retry
    headers = flow.request.headers
    if "x-sidekey-retries" in headers or "x-sidekey-timeout" in headers:
        policy = with_overrides(policy, headers.pop("x-sidekey-retries", None), headers.pop("x-sidekey-timeout", None))
    first = URL(flow.upstream_url, encoded=True)
    route = Route(provider, policy, flow.upstream_url, first, first.raw_host or "", first.port or 443)
    original_body = flow.request.body
    # A streamed body is gone once sent; only a body held as bytes can go again.
    replayable = body.kind == "none" or isinstance(original_body, bytes)
    method = flow.request.method
    attempts = attempts_here = 0
    tried: list[UpstreamState] = []
    last: ClientResponse | errors.ProxyError | None = None
    unfit: list[UpstreamState] = []  # keys whose own limit is smaller than this one request
    over_limit: errors.RequestOverLimit | None = None
    reread = False  # an upstream 401/403 re-reads the credential once per request, never more
    while True:
        members = engine.groups.members(route.provider, route.host, route.port)
        choices = [m for m in members if m not in unfit] if unfit else members
        state = _choose(engine, route, choices, tried, first_route=route.provider is provider and not unfit)
        if state is None:  # no member can take it: every circuit is open, or every key is too small
            nxt = _next_route(engine, flow, provider, route, original_body) if replayable or not attempts else None
            if nxt is None:
                _note_attempts(flow, attempts)
                if isinstance(last, ClientResponse):
                    return last
                raise last or over_limit or _circuit_open(route.provider, members)
            route, tried, attempts_here = nxt, [], 0
            continue
        if state.target.limits and engine.member_limits is not None:
            try:
                wait = await engine.member_limits.admit_member(flow, route.provider, state)
            except errors.RequestOverLimit as err:  # never fits this key: skip it for this request only
                unfit.append(state)
                over_limit = err
                continue
            if wait:  # this key's own quota is spent: the next key, no attempt used
                log.debug("flow %s: upstream %s/%s over its own limits for %.3fs", flow.id, state.provider,
                          state.name, wait)  # fmt: skip
                state.limited_until = time.monotonic() + wait
                continue
        attempts += 1
        attempts_here += 1
        try:
            resp = await _attempt(engine, flow, route, state, body)
        except errors.ProxyError as err:
            if body.error is not None:  # the caller's body broke: that is the cause
                raise body.error from None
            tried.append(state)
            decision = retry.decide(
                route.policy, attempts_made=attempts_here, method=method, replayable=replayable,
                elapsed=_elapsed(flow), error_code=err.code, switching=_untried(members, tried), rand=engine.random,
            )  # fmt: skip
            _failed(flow, state, error=err.code)
            outcome: ClientResponse | errors.ProxyError = err
        else:
            if resp.status in (401, 403) and not reread and replayable and engine.secrets is not None:
                reread = True
                if await engine.secrets.reread(route.provider, state.target):  # a new value: try it once
                    log.debug("flow %s: %s/%s refused the credential; sending again with the one re-read",
                              flow.id, state.provider, state.name)  # fmt: skip
                    resp.release()
                    continue
            if resp.status < 400 or resp.status not in route.policy.statuses:
                return _served(flow, state, attempts, resp)
            asked = retry.server_delay(resp.headers, time.time())
            tried.append(state)
            decision = retry.decide(
                route.policy, attempts_made=attempts_here, method=method, replayable=replayable, elapsed=_elapsed(flow),
                status=resp.status, asked_delay=asked, switching=_untried(members, tried), rand=engine.random,
            )  # fmt: skip
            _failed(flow, state, status=resp.status)
            outcome = resp
        if isinstance(last, ClientResponse):
            last.release()  # only the newest failure may still be answered
        last = outcome
        if log.isEnabledFor(logging.DEBUG):  # only on a failure; says why and what happens next
            cause = outcome.status if isinstance(outcome, ClientResponse) else outcome.code
            then = f"retrying in {decision.delay:.3f}s" if decision.retry else "no retry, " + decision.reason
            log.debug("flow %s: attempt %d to %s/%s failed (%s): %s", flow.id, attempts, state.provider, state.name,
                      cause, then)  # fmt: skip
        if decision.retry:
            if decision.delay:
                await engine.sleep(decision.delay)
            continue
        nxt = _next_route(engine, flow, provider, route, original_body) if decision.failover else None
        if nxt is None:
            _note_attempts(flow, attempts)
            if isinstance(outcome, ClientResponse):
                flow.upstream_state = state
                state.in_flight += 1  # released with the response, as a served one is
                return outcome
            raise outcome
        log.debug("flow %s: failing over from %s to %s", flow.id, route.provider.name, nxt.provider.name)
        route, tried, attempts_here = nxt, [], 0


def _choose(engine: Sidekey, route: Route, members: list[UpstreamState], tried: list[UpstreamState],
            first_route: bool) -> UpstreamState | None:  # fmt: skip
    now = time.monotonic()
    if len(members) == 1 and first_route:  # the common case; the request hook checked the secret
        state = members[0]
        return state if state.available(now) else None
    creds = engine.secrets
    usable = [s for s in members if creds is None or creds.usable(route.provider, s.target)]
    return balance.pick(usable, route.provider.balance, now, engine.random, tried)


def _untried(members: list[UpstreamState], tried: list[UpstreamState]) -> bool:
    """Whether another member can take the retry now (no need to back off)."""
    now = time.monotonic()
    return len(members) > 1 and any(s not in tried and s.available(now) for s in members)


def _next_route(engine: Sidekey, flow: Flow, matched: Provider, route: Route, body: object) -> Route | None:
    """The next fallback of the matched provider that can take this request
    and has a member whose circuit lets it through."""
    if _elapsed(flow) >= route.policy.deadline:
        return None
    fallbacks = matched.fallbacks
    for index in range(route.next_fallback, len(fallbacks)):
        fb = fallbacks[index]
        target = flow.policy.provider(fb.provider)
        path = flow.request.path
        rewritten = failover.rewrite(fb, path, body) if target is not None else None
        if target is None or rewritten is None:
            continue
        host, port = _address(target)
        nxt = Route(target, dataclasses.replace(target.retry, deadline=route.policy.deadline), None, None, host, port,
                    rewritten.path, rewritten.body, index + 1)  # fmt: skip
        if _choose(engine, nxt, engine.groups.members(target, host, port), [], first_route=False) is not None:
            _switch_provider(flow, route.provider, target, rewritten.body if rewritten.body is not None else body)
            return nxt
    return None


def _address(provider: Provider) -> tuple[str, int]:
    """Where a fallback's members without their own URL go (the loader makes
    sure such a provider has an upstream or an exact first host)."""
    up = provider.upstream
    return (up.host, up.port) if up is not None else (provider.hosts[0], 443)


def _switch_provider(flow: Flow, before: Provider, after: Provider, body: object) -> None:
    """The request as the fallback provider wants it: the old provider's
    credential gone, the new one's required headers set."""
    headers = flow.request.headers
    if before.auth.type == "header":
        headers.popall(before.auth.header, None)
    for name in after.strip_headers:
        headers.popall(name, None)
    for name, value in after.set_headers:
        headers.setdefault(name, value)
    flow.request.body = body  # type: ignore[assignment]
    if isinstance(body, bytes):
        flow.request.content_length = len(body)


def _circuit_open(provider: Provider, members: list[UpstreamState]) -> errors.ProxyError:
    """No member can take a request: say when one can again."""
    now = time.monotonic()
    waits = [max(s.breaker.retry_after(now), s.resting_until - now, s.limited_until - now) for s in members]
    seconds = math.ceil(min(waits, default=1.0)) or 1
    if any(s.limited_until > now for s in members) and all(s.breaker.state == "closed" for s in members):
        return errors.RateLimited(provider.name, scope="upstream", seconds=seconds)
    if all(s.breaker.state == "closed" for s in members):  # resting after 429s, circuits fine
        return errors.UpstreamThrottled(provider.name, seconds=seconds)
    return errors.CircuitOpen(provider.name, seconds=seconds)


def _elapsed(flow: Flow) -> float:
    """Seconds since the request arrived, the failed attempt included (only
    read on the failure path: the deadline is about when a retry would start)."""
    return time.monotonic() - flow.timings["start"]


def _failed(flow: Flow, state: UpstreamState, *, status: int | None = None, error: str | None = None) -> None:
    failures = flow.metadata.setdefault("failures", [])
    entry: dict[str, object] = {"provider": state.provider, "upstream": state.name}
    entry.update({"status": status} if status is not None else {"error": error})
    failures.append(entry)


def _served(flow: Flow, state: UpstreamState, attempts: int, resp: ClientResponse) -> ClientResponse:
    flow.upstream_state = state
    state.in_flight += 1  # until the response is released (exchange.run_flow)
    _note_attempts(flow, attempts)
    return resp


def _note_attempts(flow: Flow, attempts: int) -> None:
    if attempts > 1:  # the common case leaves metadata empty (audit's fast path)
        flow.metadata["attempts"] = attempts


async def _attempt(engine: Sidekey, flow: Flow, route: Route, state: UpstreamState, body: BodyReader) -> ClientResponse:
    provider = route.provider
    if state.target.upstream is None and route.url is not None:
        url = route.url
    else:
        url = member_url(provider, state, route.path or flow.request.path)
    flow.upstream_url = plain = url
    log.debug("flow %s: sending to %s/%s (%s:%d)", flow.id, state.provider, state.name, state.host, state.port)
    if engine.secrets is not None:
        url = engine.secrets.inject(flow.request.headers, url, provider, state.target)
    parsed = route.parsed if url is plain and url is route.url and route.parsed is not None else URL(url, encoded=True)
    now = time.monotonic()
    if not state.breaker.allow(now):
        raise errors.CircuitOpen(provider.name, seconds=math.ceil(state.breaker.retry_after(now)) or 1)
    flow.timings["request_sent"] = now
    state.in_flight += 1
    try:
        resp = await _send(engine, flow, provider, parsed)
    except errors.ProxyError as err:
        state.in_flight -= 1
        if body.error is not None:  # the caller's body broke mid-upload: no upstream outcome to count
            state.breaker.abandon()
            raise
        if isinstance(err, errors.UpstreamTLSError):
            bundle = engine.pools.ca_bundles.get(provider.tls.ca_bundle) if provider.tls.ca_bundle else None
            upstream.log_tls_failure(err, provider, state, bundle)
        engine.notify(state, state.record(True, time.monotonic(), error=err.code))
        raise
    except BaseException:
        state.in_flight -= 1
        state.breaker.abandon()
        raise
    state.in_flight -= 1
    flow.timings["response_headers"] = end = time.monotonic()
    failed = resp.status >= 500 or resp.status == 429
    asked = retry.server_delay(resp.headers, time.time()) if failed else None
    changes = state.record(failed, end, latency=end - now, status=resp.status, retry_after=asked)
    if not failed and "0" in resp.headers.values():  # cheap pre-check: some counter may be at 0
        rest = retry.quota_rest(resp.headers, time.time())
        if rest:  # the key's window is spent: rest it before the upstream starts refusing
            state.resting_until = end + min(rest, balance.MAX_REST)
    if changes:
        engine.notify(state, changes)
    return resp


def member_url(provider: Provider, state: UpstreamState, path: str) -> str:
    """Where ``path`` goes on this member: its own URL's prefix, else the provider's."""
    up = state.target.upstream or provider.upstream
    prefix = up.path_prefix if up is not None else ""
    return f"https://{routing.format_authority(state.host, state.port)}{prefix}{path}"


def _session(engine: Sidekey, provider: Provider | None, url: URL) -> ClientSession:
    key = engine.pools.key(provider, url.scheme, url.raw_host or "", url.port or 443, engine.guard)
    return engine.pools.session(key)  # raises AddressBlocked for a metadata IP literal


async def _send(engine: Sidekey, flow: Flow, provider: Provider | None, url: URL) -> ClientResponse:
    if flow.websocket is not None:  # a dedicated connection; the answer reads like a ClientResponse here
        return cast(ClientResponse, await ws_upstream.connect(engine, flow, provider, url))
    session = _session(engine, provider, url)
    server_name = provider.tls.server_name if provider else None
    return await upstream.send(session, flow, url, engine.pools.timeout(provider), server_name)


async def probe(engine: Sidekey, provider: Provider, state: UpstreamState, method: str, path: str) -> int:
    """A health check: one request to the member as traffic reaches it (its
    credential, the provider's headers, the same pools and guard); its status."""
    headers: CIMultiDict[str] = CIMultiDict(provider.set_headers)
    url = member_url(provider, state, path)
    if engine.secrets is not None:
        url = engine.secrets.inject(headers, url, provider, state.target)
    target = URL(url, encoded=True)
    session = _session(engine, provider, target)
    async with session.request(method, target, headers=headers, allow_redirects=False,
                               server_hostname=provider.tls.server_name) as resp:  # fmt: skip
        await resp.read()
        return resp.status
