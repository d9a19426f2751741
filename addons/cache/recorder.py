"""The body observer of a miss: it keeps what will be stored and feeds the
followers waiting on the same request.

It wraps the observer already on the flow (the usage meter's), so one pass
over each piece serves the meter, the entry and the followers.
"""

from __future__ import annotations

from typing import Any

from addons.cache.flight import Flight
from addons.cache.sse import StreamJudge
from proxy.flow import ObserverTee


class Recorder(ObserverTee):
    """Keeps the pieces (up to the entry limit), judges a stream, publishes each
    piece to the flight, then calls the observer it wrapped."""

    __slots__ = ("pieces", "size", "limit", "judge", "flight")

    def __init__(self, inner: Any, limit: int, judge: StreamJudge | None, flight: Flight | None) -> None:
        super().__init__(inner)
        self.pieces: list[bytes] | None = []  # None: past the limit (or not storable), not stored
        self.size = 0
        self.limit = limit
        self.judge = judge
        self.flight = flight

    def __call__(self, piece: bytes) -> None:
        self.size += len(piece)
        if self.pieces is not None:
            if self.size > self.limit:
                self.pieces = None
            else:
                self.pieces.append(piece)
                if self.judge is not None:
                    self.judge.feed(piece)
        if self.flight is not None:
            self.flight.publish(piece)
        if self.inner is not None:
            self.inner(piece)

    @property
    def clean(self) -> bool:
        """Whether what was recorded may be stored: whole, and a stream ended cleanly."""
        return self.pieces is not None and (self.judge is None or self.judge.clean)

    def __repr__(self) -> str:
        kept = "not kept" if self.pieces is None else f"{len(self.pieces)} pieces kept"
        return f"Recorder({self.size}B, {kept})"
