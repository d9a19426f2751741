"""A WebSocket session's bytes, both ways, after the 101: relayed as they
arrive (no buffering, no re-framing), so extensions, close codes and reasons
pass exactly as the peers sent them.

Each direction has a ``FrameTracker`` (frame boundaries, close frames). The
relay speaks only to end a session itself, and only with a close frame
between two frames; mid-frame it cuts the connection instead:

- idle (no bytes either way for ``idle_timeout``), too long (``max_duration``)
  or sidekey draining: close 1001 to both sides, then their replies are
  awaited up to ``CLOSE_WAIT``;
- the upstream gone without a close frame: close 1011 to the client (RFC 6455
  §7.4.1: the server met a condition it could not handle), never a clean
  1000: the client must not take a cut answer for a finished one;
- the client gone without a close frame: the upstream connection is cut
  (it sees an abnormal close too, 1006).

A close frame from either side is relayed, then the other side's reply, then
both connections are closed (the client's after the upstream's, as a server
closes first, §7.1.1). Every transport is closed on every path.

``WebSocketSession`` is what a flow carries for its session (``flow.websocket``):
it lives here, below the flow, so the flow can name it without importing the
session's request handling (``proxy.ws_session``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from proxy.ws_frames import ABNORMAL, GOING_AWAY, INTERNAL_ERROR, FrameTracker, close_frame

if TYPE_CHECKING:
    from proxy.policy import Provider

PIECE = 65536
CLOSE_WAIT = 5.0  # seconds a closing handshake may take before the connection is cut

# How a pump ended: its source closed (eof), its source failed (lost), writing
# to its destination failed (dst_lost), or it relayed a close frame (closed).
PumpEnd = Literal["eof", "lost", "dst_lost", "closed"]
EndedBy = Literal["client", "upstream", "client_lost", "upstream_lost", "idle", "max_duration", "drain"]
Observer = Callable[[bytes], None]

REASONS: dict[str, str] = {
    "idle": "idle timeout",
    "max_duration": "session too long",
    "drain": "sidekey is shutting down",
    "upstream_lost": "upstream connection lost",
}


def expiry(now: float, started: float, last: float, idle: float, longest: float) -> tuple[float, EndedBy | None]:
    """Seconds until the session must end, and why it must end now (None: not yet)."""
    idle_left = last + idle - now
    total_left = started + longest - now
    if total_left <= 0:
        return 0.0, "max_duration"
    if idle_left <= 0:
        return 0.0, "idle"
    return min(idle_left, total_left), None


@dataclass(slots=True)
class Outcome:
    ended_by: EndedBy
    close_code: int  # what the client saw: a close frame's code, or 1006 for a cut
    client_code: int | None  # the close code the client sent, if any
    upstream_code: int | None  # the close code the upstream sent, if any


class Relay:
    def __init__(
        self,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        *,
        idle_timeout: float,
        max_duration: float,
        clock: Callable[[], float] = time.monotonic,
        observe_up: Observer | None = None,
        observe_down: Observer | None = None,
    ) -> None:
        self.client_reader, self.client_writer = client
        self.up_reader, self.up_writer = upstream
        self.idle_timeout, self.max_duration = idle_timeout, max_duration
        self.clock = clock
        self.up = FrameTracker()  # client -> upstream
        self.down = FrameTracker()  # upstream -> client
        self.observe_up, self.observe_down = observe_up, observe_down
        self.started = self.last = clock()
        self.sent_code: int | None = None  # the close code sidekey sent the client
        self.client_cut = False
        self._first_close: EndedBy | None = None  # whose close frame came first: the other's is the reply
        self._stop = asyncio.Event()
        self._stop_reason: EndedBy = "drain"

    def stop(self, reason: EndedBy = "drain") -> None:
        """End the session with 1001 (sidekey draining)."""
        self._stop_reason = reason
        self._stop.set()

    async def run(self) -> Outcome:
        to_up = asyncio.create_task(self._pump(self.client_reader, self.up_writer, self.up, self.observe_up, "client"))
        to_down = asyncio.create_task(
            self._pump(self.up_reader, self.client_writer, self.down, self.observe_down, "upstream")
        )
        stopped = asyncio.create_task(self._stop.wait())
        tasks = (to_up, to_down, stopped)
        try:
            ended_by = await self._watch(to_up, to_down, stopped)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._close_all()
        seen = self.sent_code if self.sent_code is not None else self.down.close_code
        return Outcome(ended_by, ABNORMAL if self.client_cut or seen is None else seen,
                       self.up.close_code, self.down.close_code)  # fmt: skip

    async def _watch(self, to_up: asyncio.Task[PumpEnd], to_down: asyncio.Task[PumpEnd],
                     stopped: asyncio.Task[bool]) -> EndedBy:  # fmt: skip
        while True:
            left, expired = expiry(self.clock(), self.started, self.last, self.idle_timeout, self.max_duration)
            if expired is not None:
                await self._close_both(expired, to_up, to_down)
                return expired
            done, _ = await asyncio.wait((to_up, to_down, stopped), timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if stopped in done:
                await self._close_both(self._stop_reason, to_up, to_down)
                return self._stop_reason
            if to_down in done:
                return await self._down_ended(to_down.result(), to_up)
            if to_up in done:
                return await self._up_ended(to_up.result(), to_down)

    async def _down_ended(self, end: PumpEnd, to_up: asyncio.Task[PumpEnd]) -> EndedBy:
        if end == "closed":  # the upstream's close frame went to the client: its reply goes back
            await _bounded(to_up)
            return self._first_close or "upstream"
        if end == "dst_lost":
            self._cut_upstream()
            return "client_lost"
        to_up.cancel()  # the upstream is gone: nothing more goes there
        await asyncio.gather(to_up, return_exceptions=True)
        self._cut_upstream()
        self._close_client(INTERNAL_ERROR, "upstream_lost")
        await self._client_reply()
        return "upstream_lost"

    async def _up_ended(self, end: PumpEnd, to_down: asyncio.Task[PumpEnd]) -> EndedBy:
        if end == "closed":  # the client's close frame went upstream: the upstream's reply comes back
            await _bounded(to_down)
            return self._first_close or "client"
        if end == "dst_lost":  # writing upstream failed: the upstream is gone
            to_down.cancel()
            await asyncio.gather(to_down, return_exceptions=True)
            self._cut_upstream()
            self._close_client(INTERNAL_ERROR, "upstream_lost")
            await self._client_reply()
            return "upstream_lost"
        self._cut_upstream()  # the client left without a close frame: so does the upstream
        return "client_lost"

    async def _close_both(self, reason: EndedBy, to_up: asyncio.Task[PumpEnd], to_down: asyncio.Task[PumpEnd]) -> None:
        for task in (to_up, to_down):
            task.cancel()
        await asyncio.gather(to_up, to_down, return_exceptions=True)
        text = REASONS[reason]
        if self.up.at_boundary and not self.up.close_seen:
            with contextlib.suppress(ConnectionError, OSError):
                self.up_writer.write(close_frame(GOING_AWAY, text, masked=True))
        else:
            self._cut_upstream()
        self._close_client(GOING_AWAY, reason)
        await asyncio.gather(self._client_reply(), self._upstream_reply())

    def _close_client(self, code: int, reason: EndedBy) -> None:
        """Our close frame to the client, or a cut when it is mid-frame (or already closing)."""
        if self.down.at_boundary and not self.down.close_seen and not self.client_writer.is_closing():
            try:
                self.client_writer.write(close_frame(code, REASONS[reason], masked=False))
                self.sent_code = code
                return
            except (ConnectionError, OSError):
                pass
        self._cut_client()

    async def _client_reply(self) -> None:
        """Read the client's close frame (its reply to ours), up to CLOSE_WAIT."""
        if not self.client_cut:
            await _discard_until_close(self.client_reader, self.up)

    async def _upstream_reply(self) -> None:
        if not self.up_writer.is_closing():
            await _discard_until_close(self.up_reader, self.down)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, tracker: FrameTracker,
                    observe: Observer | None, side: EndedBy) -> PumpEnd:  # fmt: skip
        while True:
            try:
                data = await src.read(PIECE)
            except (ConnectionError, OSError):
                return "lost"
            if not data:
                return "eof"
            tracker.feed(data)
            if tracker.close_seen and self._first_close is None:
                self._first_close = side
            if observe is not None:
                observe(data)
            self.last = self.clock()
            try:
                dst.write(data)
                await dst.drain()
            except (ConnectionError, OSError):
                return "dst_lost"
            if tracker.close_seen:  # RFC 6455 §5.5.1: nothing follows a close frame
                return "closed"

    def _cut_upstream(self) -> None:
        self.up_writer.transport.abort()

    def _cut_client(self) -> None:
        self.client_cut = True
        self.client_writer.transport.abort()

    def _close_all(self) -> None:
        """Upstream first, then the client (a server closes first, RFC 6455 §7.1.1)."""
        if not self.up_writer.is_closing():
            self.up_writer.close()
        if not self.client_writer.is_closing():
            self.client_writer.close()

    def __repr__(self) -> str:
        return f"Relay(up={self.up!r}, down={self.down!r})"


async def _bounded(task: asyncio.Task[PumpEnd]) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CLOSE_WAIT):
            await asyncio.shield(task)


async def _discard_until_close(reader: asyncio.StreamReader, tracker: FrameTracker) -> None:
    with contextlib.suppress(TimeoutError, ConnectionError, OSError):
        async with asyncio.timeout(CLOSE_WAIT):
            while not tracker.close_seen:
                data = await reader.read(PIECE)
                if not data:
                    return
                tracker.feed(data)


class WebSocketSession:
    """One session: set on ``flow.websocket`` when the upgrade is accepted for
    forwarding (the forwarder then opens a dedicated connection)."""

    __slots__ = ("provider", "caller", "relay", "started")

    def __init__(self, provider: Provider, caller: str) -> None:
        self.provider = provider
        self.caller = caller
        self.relay: Relay | None = None
        self.started = time.monotonic()

    def __repr__(self) -> str:
        return f"WebSocketSession({self.provider.name}, relay={self.relay!r})"
