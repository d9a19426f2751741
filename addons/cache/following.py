"""A coalesced follower's answer body: the flight's pieces as they come, at the
follower's own pace (``addons.cache.flight``).

A follower that falls further behind than the flight's window is cut off:
its stream ends with an SSE ``event: error`` (``cache_follower_too_slow``)
and a broken framing, never with data silently skipped. A leader's failure
mid-answer ends followers the way it ends the leader's own client (the
provider's ``sse_error_event`` decides whether an event is written).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from addons.cache.flight import Flight, FlightFailed
from proxy.errors import ProxyError, UpstreamDisconnected, sse_error_event
from proxy.policy import Provider


class FollowerTooSlow(ProxyError):
    status, code, retryable = 502, "cache_follower_too_slow", True
    flush_before_abort = True  # its error event is written behind what the slow client has not read yet
    template = "this request read the shared answer of provider {provider} too slowly and was cut off"


async def follower_stream(flight: Flight, provider: Provider, sse: bool) -> AsyncIterator[bytes]:
    try:
        async for piece in flight.follow():
            yield piece
    except FlightFailed as failed:
        if not failed.slow:
            raise UpstreamDisconnected(provider.name) from None
        err = FollowerTooSlow(provider.name)
        if sse and not provider.sse_error_event:  # with it on, the writer adds the event itself
            yield sse_error_event(err)
        raise err from None
