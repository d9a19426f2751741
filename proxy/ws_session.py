"""A WebSocket upgrade to a matched provider, from request head to the last
relayed byte.

The upgrade goes through the pipeline every request takes: routing, the
``request`` hooks (caller credentials stripped, ``set_headers``, limits,
budgets), then the forwarder (member choice, the member's credential,
retries on connect failures, the circuit) with a dedicated upstream
connection (``proxy.ws_upstream``). A 101 is relayed and ``proxy.ws_relay``
moves the bytes until either side closes; any other answer (401, 429, ...)
is relayed as an HTTP answer. The flow ends with the ``response`` hook (or
``error`` when a side was lost), so limits are released and the session is
audited like a request. ``Sessions`` counts open sessions for
``limits.concurrent_websockets``, drains them on shutdown and feeds metrics.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, cast

from yarl import URL

from proxy import errors, http1, responses, ws_frames
from proxy.attempt_loop import forward
from proxy.bodies import BodyReader
from proxy.capabilities import SESSION_TOKENS, SESSION_USAGE
from proxy.flow import Flow, Response
from proxy.ws_meter import SessionMeter
from proxy.ws_relay import CLOSE_WAIT, Outcome, Relay, WebSocketSession
from proxy.ws_upstream import UpgradeResponse

if TYPE_CHECKING:
    from proxy.conn import ClientConn, Engine
    from proxy.policy import Provider

log = logging.getLogger("sidekey.websocket")

# Session length buckets (seconds) of sidekey_websocket_session_seconds.
DURATION_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)


class Sessions:
    """This process's WebSocket sessions: admission, drain and statistics."""

    def __init__(self) -> None:
        self.open: set[WebSocketSession] = set()
        self._per_provider: Counter[str] = Counter()
        self._per_caller: Counter[tuple[str, str]] = Counter()
        self.opened = 0
        self.refused = 0
        self.bytes_up = 0  # client -> upstream, closed sessions
        self.bytes_down = 0
        self.closes: Counter[tuple[str, str]] = Counter()  # (provider, close code label)
        self.durations = [0] * (len(DURATION_BUCKETS) + 1)  # per bucket, the last for +Inf
        self.duration_sum = 0.0
        self._none_open = asyncio.Event()

    def admit(self, session: WebSocketSession) -> errors.ProxyError | None:
        """Count the session in, or say which limit refuses it (before any upgrade)."""
        ws, name = session.provider.websocket, session.provider.name
        if ws.max_sessions and self._per_provider[name] >= ws.max_sessions:
            self.refused += 1
            return errors.RateLimited(name, scope="concurrent_websockets", seconds=1)
        who = (name, session.caller)
        if ws.caller_max_sessions and self._per_caller[who] >= ws.caller_max_sessions:
            self.refused += 1
            return errors.RateLimited(name, scope="caller concurrent_websockets", seconds=1)
        self.open.add(session)
        self._per_provider[name] += 1
        self._per_caller[who] += 1
        return None

    def release(self, session: WebSocketSession) -> None:
        if session not in self.open:
            return
        self.open.discard(session)
        name = session.provider.name
        who = (name, session.caller)
        self._per_provider[name] -= 1
        self._per_caller[who] -= 1
        if self._per_provider[name] <= 0:
            del self._per_provider[name]
        if self._per_caller[who] <= 0:
            del self._per_caller[who]
        if not self.open:
            self._none_open.set()

    def ended(self, session: WebSocketSession, outcome: Outcome, seconds: float, up: int, down: int) -> None:
        self.bytes_up += up
        self.bytes_down += down
        self.closes[(session.provider.name, ws_frames.close_label(outcome.close_code))] += 1
        self.durations[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.duration_sum += seconds

    async def close_all(self) -> None:
        """Drain: every session gets 1001, then up to CLOSE_WAIT for the handshakes."""
        for session in list(self.open):
            if session.relay is not None:
                session.relay.stop("drain")
        if self.open:
            self._none_open.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_WAIT + 1.0):
                    await self._none_open.wait()

    def statistics(self) -> dict[str, Any]:
        relays = [s.relay for s in self.open if s.relay is not None]
        return {
            "open": len(self.open),
            "open_by_provider": dict(self._per_provider),
            "opened": self.opened,
            "refused": self.refused,
            "bytes_up": self.bytes_up + sum(r.up.bytes for r in relays),
            "bytes_down": self.bytes_down + sum(r.down.bytes for r in relays),
            "closes": [{"provider": p, "code": c, "count": n} for (p, c), n in sorted(self.closes.items())],
            "duration_buckets": list(zip(DURATION_BUCKETS, _cumulative(self.durations), strict=False)),
            "duration_count": sum(self.durations),
            "duration_sum": self.duration_sum,
        }

    def __repr__(self) -> str:
        return f"Sessions(open={len(self.open)}, opened={self.opened})"


def _cumulative(counts: list[int]) -> list[int]:
    out, total = [], 0
    for n in counts:
        total += n
        out.append(total)
    return out


async def serve(engine: Engine, conn: ClientConn, flow: Flow, kind: http1.BodyKind) -> bool:
    """One upgrade request (``http_session.handle`` calls this for a matched
    provider); returns False: the connection is done after a session."""

    provider = flow.provider
    assert provider is not None, "http_session.handle sends only matched providers here"
    ws = provider.websocket
    session = WebSocketSession(provider, flow.caller)
    refusal = _refusal(engine, provider, session, kind)
    if refusal is not None:
        await _answer_error(engine, conn, flow, refusal)
        return False
    flow.websocket = session
    headers = flow.request.headers
    if ws.usage != "none" and "sec-websocket-extensions" in headers:
        offers = ws_frames.strip_deflate(", ".join(headers.popall("sec-websocket-extensions")))
        if offers is not None:
            headers["sec-websocket-extensions"] = offers
    body = BodyReader(conn.reader, "none", 0, max_bytes=0, timeout=1.0, on_start=None, write=conn.writer)
    resp: UpgradeResponse | None = None
    engine.in_flight += 1
    try:
        await engine.addons.decide("request", flow)
        if flow.response is not None:  # a local answer (a limit, a budget)
            await responses.send_local(conn, flow, False)
            flow.timings["end"] = time.monotonic()
            await engine.addons.observe("response", flow)
            return False
        resp = cast(UpgradeResponse, await forward(engine, flow, body))
        flow.response = Response(resp.status, http1.end_to_end(resp.headers), reason=resp.reason or None)
        if resp.status == 101:
            problem = ws_frames.upgrade_accepted(resp.head, metering=ws.usage != "none")
            if problem is not None:
                log.warning("flow %s: upstream %s answered the upgrade wrongly: %s", flow.id, provider.name, problem)
                raise errors.UpstreamProtocolError(provider.name)
        await engine.addons.decide("responseheaders", flow)
        if resp.status != 101 or flow.response.body is not None:
            await _answer_locally(engine, conn, flow, resp)
            return False
        await _run_session(engine, conn, flow, session, resp)
        resp = None  # the relay closed it
        return False
    except (errors.ProxyError, OSError) as exc:
        err = exc if isinstance(exc, errors.ProxyError) else errors.ClientGone(flow.provider_name)
        flow.error = err
        flow.timings["end"] = time.monotonic()
        if not conn.head_sent and not isinstance(err, errors.ClientGone):
            flow.response = Response.from_error(err)
            with contextlib.suppress(ConnectionError, OSError):
                await responses.send_local(conn, flow, False)
        else:
            conn.writer.transport.abort()
        await engine.addons.observe("error", flow)
        return False
    finally:
        engine.in_flight -= 1
        engine.websockets.release(session)
        if flow.attempt is not None:
            flow.attempt.release()
        if resp is not None:
            resp.close()


def _refusal(engine: Engine, provider: Provider, session: WebSocketSession,
             kind: http1.BodyKind) -> errors.ProxyError | None:  # fmt: skip
    """Why this upgrade is answered without going upstream, if it is."""
    if kind != "none":
        return errors.BadRequest(reason="a WebSocket upgrade carries no body")
    if not provider.websocket.allowed:
        return errors.WebSocketNotAllowed(provider.name)
    return engine.websockets.admit(session)


async def _answer_locally(engine: Engine, conn: ClientConn, flow: Flow, resp: UpgradeResponse) -> None:
    """No session: an addon's answer, or the upstream's refusal relayed as an HTTP answer."""

    assert flow.response is not None
    if flow.response.body is None:
        flow.response.body = await resp.read_body() or b""
        flow.response.headers.popall("content-length", None)
    await responses.send_local(conn, flow, False)
    flow.timings["end"] = time.monotonic()
    await engine.addons.observe("response", flow)


async def _run_session(engine: Engine, conn: ClientConn, flow: Flow, session: WebSocketSession,
                       resp: UpgradeResponse) -> None:  # fmt: skip
    provider = session.provider
    out = flow.response
    assert out is not None
    headers = out.headers
    exchange_headers(flow, headers)
    meter = None
    if provider.websocket.usage == "openai-realtime":
        model = URL(flow.request.path, encoded=True).query.get("model")
        meter = SessionMeter(flow, engine.addons.capability(SESSION_TOKENS),
                             engine.addons.capability(SESSION_USAGE), model)  # fmt: skip
    conn.head_sent = True
    conn.writer.write(http1.response_head(101, headers.items()))
    relay = session.relay = Relay(
        (conn.reader, conn.writer),
        (resp.reader, resp.writer),
        idle_timeout=provider.websocket.idle_timeout,
        max_duration=provider.websocket.max_duration,
        observe_up=meter.observe_up if meter is not None else None,
        observe_down=meter.observe_down if meter is not None else None,
    )
    engine.websockets.opened += 1
    flow.metadata["websocket"] = {"event": "open"}
    await engine.addons.observe("websocket_start", flow)
    try:
        outcome = await relay.run()
    finally:
        if meter is not None:
            meter.finish()
    end = flow.timings["end"] = time.monotonic()
    flow.bytes_to_client, flow.bytes_from_client = relay.down.bytes, relay.up.bytes
    flow.metadata["websocket"] = {
        "event": "close",
        "ended_by": outcome.ended_by,
        "close_code": outcome.close_code,
        "client_close_code": outcome.client_code,
        "upstream_close_code": outcome.upstream_code,
        "frames_up": relay.up.frames,
        "frames_down": relay.down.frames,
        "bytes_up": relay.up.bytes,
        "bytes_down": relay.down.bytes,
    }
    engine.websockets.ended(session, outcome, end - session.started, relay.up.bytes, relay.down.bytes)
    if outcome.ended_by == "upstream_lost":
        flow.error = errors.UpstreamDisconnected(provider.name)
    elif outcome.ended_by == "client_lost":
        flow.error = errors.ClientGone(provider.name)
    await engine.addons.observe("error" if flow.error is not None else "response", flow)


def exchange_headers(flow: Flow, headers: Any) -> None:
    """Who served it, and the two fields a 101 needs (RFC 6455 §4.2.2)."""
    headers["x-sidekey-request-id"] = flow.id
    state = flow.upstream_state
    if state is not None:
        headers["x-sidekey-provider"] = state.provider
        headers["x-sidekey-upstream"] = state.name
    headers["upgrade"] = "websocket"
    headers["connection"] = "Upgrade"


async def _answer_error(engine: Engine, conn: ClientConn, flow: Flow, err: errors.ProxyError) -> None:
    """A refusal before anything went upstream, audited like any refused request."""

    flow.error = err
    flow.response = Response.from_error(err)
    flow.timings["end"] = time.monotonic()
    with contextlib.suppress(ConnectionError, OSError):
        await responses.send_local(conn, flow, False)
    await engine.addons.observe("error", flow)
