"""Single flight: identical requests in flight at once go upstream once.

The first request with a key leads: its answer is published here piece by
piece as it is sent to its own caller. Followers that join later get the
pieces so far, then the rest live, each at its own pace: they read a shared
log, so a slow follower costs no copy and never slows the leader or the
others. The log is kept whole while it fits the entry limit (it becomes the
entry); past that only the last ``window`` bytes are kept, the flight takes
no new followers, and a follower that falls further behind than the window
is cut off with an error, never silently skipped ahead.

A flight that fails before a follower saw any of its bytes lets the
follower try again: the first to wake leads a new flight (within its own
deadline), the rest follow that one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from multidict import CIMultiDict


class FlightFailed(Exception):
    """The leader's answer ended badly after this follower got part of it, or
    (``slow``) this follower fell further behind than the window."""

    def __init__(self, *, slow: bool = False) -> None:
        super().__init__("too slow" if slow else "failed")
        self.slow = slow


class Flight:
    __slots__ = ("key", "status", "headers", "chunks", "base", "size", "done", "failed", "open", "followers",
                 "window", "saved_usd", "_wake")  # fmt: skip

    def __init__(self, key: str, window: int) -> None:
        self.key = key
        self.window = window  # bytes a follower may fall behind
        self.status: int | None = None
        self.headers: CIMultiDict[str] | None = None
        self.chunks: list[bytes] = []
        self.base = 0  # absolute index of chunks[0] (older ones were trimmed)
        self.size = 0  # bytes published
        self.done = False
        self.failed = False
        self.open = True  # takes new followers
        self.followers = 0
        self.saved_usd = 0.0  # the leader's measured cost: what each follower saved
        self._wake = asyncio.Event()

    # -- the leader --------------------------------------------------------------------
    def head(self, status: int, headers: CIMultiDict[str]) -> None:
        self.status, self.headers = status, headers
        self._notify()

    def publish(self, piece: bytes) -> None:
        self.chunks.append(piece)
        self.size += len(piece)
        if self.size > self.window:  # past the entry limit: keep a window, take no one new
            self.open = False
            kept = sum(len(c) for c in self.chunks)
            while len(self.chunks) > 1 and kept - len(self.chunks[0]) >= self.window:
                kept -= len(self.chunks.pop(0))
                self.base += 1
        self._notify()

    def finish(self) -> None:
        self.done, self.open = True, False
        self._notify()

    def fail(self) -> None:
        if not self.done:
            self.failed, self.open = True, False
            self._notify()

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    # -- followers ---------------------------------------------------------------------
    async def changed(self) -> None:
        await self._wake.wait()

    async def wait_start(self) -> bool:
        """Until a follower can start answering: the answer's first piece (or
        its end). False: the flight failed before that, so the follower may lead."""
        while True:
            if self.failed:
                return False
            if self.done or (self.status is not None and self.chunks):
                return True
            await self.changed()

    async def follow(self) -> AsyncIterator[bytes]:
        """Every piece from the start; raises FlightFailed when cut or failed."""
        index = 0  # absolute chunk index
        sent = 0
        while True:
            while index < self.base + len(self.chunks):
                if index < self.base or self.size - sent > self.window:
                    raise FlightFailed(slow=True)  # the pieces it needs are gone (or nearly)
                piece = self.chunks[index - self.base]
                index += 1
                sent += len(piece)
                yield piece
            if self.done:
                return
            if self.failed:
                raise FlightFailed()
            await self.changed()

    def has_followers(self) -> bool:
        """Someone besides the leader reads this answer (the leader's client may leave)."""
        return self.followers > 0

    def body(self) -> bytes | None:
        """The whole answer, when every piece is still here."""
        return b"".join(self.chunks) if self.base == 0 else None

    def __repr__(self) -> str:
        state = "done" if self.done else "failed" if self.failed else "flying"
        return f"Flight({self.key[:12]} {state} {self.size}B {self.followers} followers)"
