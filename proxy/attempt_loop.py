"""The attempt loop (the forwarder): one request's attempts across the members of its provider's
upstream group and then its fallbacks, under one deadline. It carries out
the verdicts of the attempt planner (``proxy.plan``: which member, retry or
wait, fail over, stop; pure), and does the I/O between them. Every attempt
runs the addons' ``upstream_attempt`` hooks (the member's credential, the
provider's headers, the key's own limits), so a retry to another member or a
fallback to another provider runs exactly the code the first attempt ran.

The common request (one member, answered) is sent without building a plan.
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

from proxy import balance, errors, retry, routing, upstream, ws_upstream
from proxy.attempt import Attempt, Probe
from proxy.balance import UpstreamState
from proxy.bodies import BodyReader
from proxy.flow import Flow, Request
from proxy.plan import Answered, Failed, Failover, HeldOff, Outcome, OverLimit, Plan, Route, Send, Sleep
from proxy.policy import Provider, RetryPolicy, Target

if TYPE_CHECKING:
    from proxy.conn import Engine

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


async def forward(engine: Engine, flow: Flow, body: BodyReader) -> ClientResponse:
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
    route = Route(provider, policy, flow.upstream_url, first.raw_host or "", first.port or 443)
    # The common case, a first member that can take it, is sent without a plan; a plan is
    # built only once the first attempt did not serve (or when no member can take it).
    state = _first_member(engine, provider, engine.groups.members(provider, route.host, route.port))
    if state is not None:
        attempt = Attempt(state, provider, headers, flow.upstream_url, 1, flow.request.body)
        try:
            resp = await _send_attempt(engine, flow, route, first, attempt, body)
        except errors.ProxyError as err:
            if body.error is not None:  # the caller's body broke: that is the cause
                raise body.error from None
            return await _carry_out(engine, flow, body, route, first, attempt, None, err)
        if resp is not None and (resp.status < 400 or resp.status not in policy.statuses) and not _refused(resp):
            return _served(flow, attempt, 1, resp)
        return await _carry_out(engine, flow, body, route, first, attempt, resp, None)
    return await _carry_out(engine, flow, body, route, first, None, None, None)


def _first_member(engine: Engine, provider: Provider, members: list[UpstreamState]) -> UpstreamState | None:
    """The member a plan would choose first on the matched provider (``Plan._choose`` with
    nothing tried): a pool's pick costs no Plan, no _Run and no Send per request."""
    now = time.monotonic()
    if len(members) == 1:  # the request hook checked the secret
        state = members[0]
        return state if state.available(now) else None
    secrets = engine.secrets
    usable = [s for s in members if secrets.usable(provider, s.target)] if secrets is not None else members
    return balance.pick(usable, provider.balance, now, engine.random)


async def _carry_out(engine: Engine, flow: Flow, body: BodyReader, route: Route, first: URL,
                     attempt: Attempt | None, resp: ClientResponse | None,
                     err: errors.ProxyError | None) -> ClientResponse:  # fmt: skip
    """The rest of a request that needs a plan: carry out its verdicts until
    one finishes. ``attempt``: the first one, already made (answered ``resp``,
    failed with ``err``, or held off by a hook)."""
    run = _Run(engine, flow, body, route, first, sent=1 if attempt else 0)
    outcome = await run.settle(attempt, resp, err) if attempt is not None else None
    while True:
        if run.served is not None:
            return run.served
        verdict = run.plan.next(outcome, time.monotonic())
        if isinstance(outcome, Answered | Failed) and log.isEnabledFor(logging.DEBUG):
            _log_failure(flow, run.plan, run.last.attempt, outcome)
        outcome = None
        if isinstance(verdict, Send):
            outcome = await run.send(verdict)
        elif isinstance(verdict, Sleep):
            await engine.sleep(verdict.seconds)
        elif isinstance(verdict, Failover):
            run.fail_over(verdict.route)
        else:
            _note_attempts(flow, run.plan.attempts)
            if verdict.error is not None:
                raise verdict.error
            return run.last.answer(flow)


class _Run:
    """One request's attempts under its plan: the I/O side of each verdict."""

    __slots__ = ("engine", "flow", "body", "first", "plan", "original_body", "base", "last", "reread", "served")

    def __init__(self, engine: Engine, flow: Flow, body: BodyReader, route: Route, first: URL, sent: int) -> None:
        req = flow.request
        self.engine, self.flow, self.body, self.first = engine, flow, body, first
        self.original_body = req.body
        secrets = engine.secrets
        self.plan = Plan(
            route, engine.groups, flow.policy, method=req.method, replayable=self.replayable,
            start=flow.timings["start"], usable=secrets.usable if secrets is not None else _always,
            rand=engine.random, path=req.path, body=self.original_body, attempts=sent,
        )  # fmt: skip
        # The request as the matched provider's hooks left it, before any credential: a fallback starts from it.
        self.base = req.headers.copy() if route.provider.fallbacks else None
        self.last = _Last()
        self.reread = False  # an upstream 401/403 re-reads the credential once per request, never more
        self.served: ClientResponse | None = None  # the answer, once an attempt was served

    @property
    def replayable(self) -> bool:
        """A streamed body is gone once sent; only a body held as bytes can go again."""
        return self.body.kind == "none" or isinstance(self.original_body, bytes)

    async def send(self, verdict: Send) -> Outcome | None:
        route = self.plan.route
        req = self.flow.request
        attempt = Attempt(verdict.member, route.provider, req.headers, route.url or "", verdict.number, req.body)
        resp = err = None
        try:
            resp = await _send_attempt(self.engine, self.flow, route, self.first, attempt, self.body)
        except errors.ProxyError as exc:
            if self.body.error is not None:  # the caller's body broke: that is the cause
                raise self.body.error from None
            err = exc
        return await self.settle(attempt, resp, err)

    async def settle(self, attempt: Attempt, resp: ClientResponse | None,
                     err: errors.ProxyError | None) -> Outcome | None:  # fmt: skip
        """What the attempt came to: an outcome for the plan, or None: send
        again (a credential re-read after a 401/403), or served (``served``)."""
        if resp is not None and _refused(resp) and await self._reread(attempt):
            resp.release()
            attempt.release()
            return None
        if resp is not None and (resp.status < 400 or resp.status not in self.plan.route.policy.statuses):
            self.last.drop()
            self.served = _served(self.flow, attempt, self.plan.attempts, resp)
            return None
        return self.last.note(self.flow, attempt, resp, err)

    async def _reread(self, attempt: Attempt) -> bool:
        secrets = self.engine.secrets
        if self.reread or secrets is None or not self.replayable:
            return False
        self.reread = True
        if not await secrets.reread(self.plan.route.provider, attempt.member.target):
            return False
        log.debug("flow %s: %s/%s refused the credential; sending again with the one re-read", self.flow.id,
                  attempt.member.provider, attempt.member.name)  # fmt: skip
        return True

    def fail_over(self, route: Route) -> None:
        """The request as the fallback provider gets it: the headers as they were
        before any provider's credential (its own are set by the per-attempt
        hooks), its path and its body (the model rewritten, when it was)."""
        log.debug("flow %s: failing over to %s", self.flow.id, route.provider.name)
        assert self.base is not None, "only a provider with fallbacks fails over"
        req = self.flow.request
        req.headers = self.base.copy()
        body = route.body if route.body is not None else self.original_body
        req.body = body
        if isinstance(body, bytes):
            req.content_length = len(body)


def _refused(resp: ClientResponse) -> bool:
    """The upstream refused the credential (a rotated key, a revoked token)."""
    return resp.status == 401 or resp.status == 403


class _Last:
    """The newest failed attempt: its response (if any) may still be the
    answer. A failed attempt is no longer in flight; the one answered takes
    its lease again until the response is released, as a served one does."""

    __slots__ = ("attempt", "resp", "err")

    def __init__(self) -> None:
        self.attempt: Attempt | None = None
        self.resp: ClientResponse | None = None
        self.err: errors.ProxyError | None = None

    def note(self, flow: Flow, attempt: Attempt, resp: ClientResponse | None, err: errors.ProxyError | None) -> Outcome:
        """What the attempt came to, for the plan; a failure becomes the newest."""
        outcome = _outcome(flow, attempt, resp, err)
        if isinstance(outcome, Answered | Failed):
            attempt.release()
            self.drop()  # only the newest failure may still be answered
            self.attempt, self.resp, self.err = attempt, resp, err
        return outcome

    def drop(self) -> None:
        if self.resp is not None:
            self.resp.release()
            self.resp = None

    def answer(self, flow: Flow) -> ClientResponse:
        """Return the last response (its lease ends with it, as a served one's does) or raise the last error."""
        if self.resp is not None and self.attempt is not None:
            flow.upstream_state = self.attempt.member
            flow.attempt = self.attempt
            self.attempt.hold()
            return self.resp
        assert self.err is not None, "a plan finishes on the last outcome only after one"
        raise self.err


def _outcome(flow: Flow, attempt: Attempt, resp: ClientResponse | None, err: errors.ProxyError | None) -> Outcome:
    state = attempt.member
    if isinstance(err, errors.RequestOverLimit):
        return OverLimit(state, err)
    if err is not None:
        _failed(flow, state, error=err.code)
        return Failed(state, err.code)
    if resp is None:
        return HeldOff(state, attempt.hold_off)
    _failed(flow, state, status=resp.status)
    return Answered(state, resp.status, retry.server_delay(resp.headers, time.time()))


def _always(_provider: Provider, _target: Target) -> bool:
    return True


def _log_failure(flow: Flow, plan: Plan, attempt: Attempt | None, outcome: Answered | Failed) -> None:
    """Only on a failure; says why and what happens next."""
    decision = plan.decision
    if decision is None or attempt is None:
        return
    cause = outcome.status if isinstance(outcome, Answered) else outcome.code
    then = f"retrying in {decision.delay:.3f}s" if decision.retry else "no retry, " + decision.reason
    log.debug("flow %s: attempt %d to %s/%s failed (%s): %s", flow.id, attempt.number, outcome.member.provider,
              outcome.member.name, cause, then)  # fmt: skip


def _failed(flow: Flow, state: UpstreamState, *, status: int | None = None, error: str | None = None) -> None:
    failures = flow.metadata.setdefault("failures", [])
    entry: dict[str, object] = {"provider": state.provider, "upstream": state.name}
    entry.update({"status": status} if status is not None else {"error": error})
    failures.append(entry)


def _served(flow: Flow, attempt: Attempt, attempts: int, resp: ClientResponse) -> ClientResponse:
    flow.upstream_state = attempt.member
    flow.attempt = attempt  # its lease ends when the response is released (http_session.run_flow)
    if attempts > 1:
        _note_attempts(flow, attempts)
    return resp


def _note_attempts(flow: Flow, attempts: int) -> None:
    if attempts > 1:  # the common case leaves metadata empty (audit's fast path)
        flow.metadata["attempts"] = attempts


async def _send_attempt(engine: Engine, flow: Flow, route: Route, first: URL, attempt: Attempt,
                        body: BodyReader) -> ClientResponse | None:  # fmt: skip
    provider = route.provider
    state = attempt.member
    if state.target.upstream is not None or route.url is None:
        attempt.url = member_url(provider, state, route.path or flow.request.path)
    flow.upstream_url = attempt.url  # without a query credential (the hooks add it to attempt.url)
    log.debug("flow %s: sending to %s/%s (%s:%d)", flow.id, state.provider, state.name, state.host, state.port)
    pending = engine.addons.upstream_attempt(flow, attempt)
    if pending is not None:
        await pending
    if attempt.hold_off:
        return None
    url = attempt.url
    parsed = first if url is route.url else URL(url, encoded=True)
    now = time.monotonic()
    if not state.breaker.allow(now):
        raise errors.CircuitOpen(provider.name, seconds=math.ceil(state.breaker.retry_after(now)) or 1)
    flow.timings["request_sent"] = now
    attempt.hold()
    try:
        resp = await _send(engine, flow, provider, parsed, attempt)
    except errors.ProxyError as err:
        attempt.release()
        if body.error is not None:  # the caller's body broke mid-upload: no upstream outcome to count
            state.breaker.abandon()
            raise
        if isinstance(err, errors.UpstreamTLSError):
            bundle = engine.pools.ca_bundles.get(provider.tls.ca_bundle) if provider.tls.ca_bundle else None
            upstream.log_tls_failure(err, provider, state, bundle)
        engine.notify(state, state.record(True, time.monotonic(), error=err.code))
        raise
    except BaseException:
        attempt.release()
        state.breaker.abandon()
        raise
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


def _session(engine: Engine, provider: Provider | None, url: URL) -> ClientSession:
    key = engine.pools.key(provider, url.scheme, url.raw_host or "", url.port or 443, engine.guard)
    return engine.pools.session(key)  # raises AddressBlocked for a metadata IP literal


async def _send(engine: Engine, flow: Flow, provider: Provider | None, url: URL,
                attempt: Attempt | None = None) -> ClientResponse:  # fmt: skip
    """``attempt``: its headers and body are what is sent (else the flow's request's)."""
    req = flow.request
    headers, body = (attempt.headers, attempt.body) if attempt is not None else (req.headers, req.body)
    if flow.websocket is not None:  # a dedicated connection; the answer reads like a ClientResponse here
        return cast(ClientResponse, await ws_upstream.connect(engine, flow, provider, url, headers))
    session = _session(engine, provider, url)
    server_name = provider.tls.server_name if provider else None
    return await upstream.send(session, flow, url, engine.pools.timeout(provider), server_name, headers, body)


async def probe(engine: Engine, provider: Provider, state: UpstreamState, method: str, path: str) -> int:
    """A health check: one request to the member as traffic reaches it. The addons'
    ``upstream_attempt`` hooks run on it as on every attempt (the member's credential,
    the provider's headers, a signature), then the same pools and guard; its status."""
    request = Request(method, path, CIMultiDict(), state.host, state.port)
    attempt = Probe(state, provider, request.headers, member_url(provider, state, path), 1)
    pending = engine.addons.upstream_attempt(Flow(request, engine.policy, provider), attempt)
    if pending is not None:
        await pending
    target = URL(attempt.url, encoded=True)
    session = _session(engine, provider, target)
    async with session.request(method, target, headers=attempt.headers, allow_redirects=False,
                               server_hostname=provider.tls.server_name) as resp:  # fmt: skip
        await resp.read()
        return resp.status
