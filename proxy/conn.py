"""One client connection, and what the request path needs from the engine.

``http_session`` (the HTTP/1.1 loop) and ``attempt_loop`` (the attempts) are handed an
``Engine``: the narrow view of ``server.Sidekey`` they use. They import this
module, never the engine, so the server -> http_session -> attempt_loop imports run one
way only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from proxy.balance import Groups, Transition, UpstreamState
    from proxy.capabilities import Secrets
    from proxy.errors import ProxyError
    from proxy.hooks import AddonManager
    from proxy.netguard import Guard
    from proxy.policy import Policy
    from proxy.upstream import UpstreamPools


class SessionTable(Protocol):
    """The open WebSocket sessions (``ws_session.Sessions``; named here, not
    imported, so the session module and this one do not import each other)."""

    opened: int

    def admit(self, session: Any, /) -> ProxyError | None: ...

    def release(self, session: Any, /) -> None: ...

    def ended(self, session: Any, outcome: Any, seconds: float, up: int, down: int, /) -> None: ...


class Engine(Protocol):
    policy: Policy  # the current snapshot; a request keeps the one it started with
    draining: bool
    in_flight: int
    addons: AddonManager
    groups: Groups
    pools: UpstreamPools
    guard: Guard
    secrets: Secrets | None
    sleep: Callable[[float], Awaitable[None]]
    random: Callable[[], float]

    @property
    def websockets(self) -> SessionTable: ...

    def notify(self, state: UpstreamState, changes: Sequence[Transition]) -> None: ...


class ClientConn:
    """One accepted client connection (its reader/writer are upgraded to TLS
    in place after CONNECT)."""

    __slots__ = ("reader", "writer", "peer", "target", "idle", "head_sent", "task", "proxy_user")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.peer: tuple[str, int] | None = (peer[0], peer[1]) if peer else None
        self.target: tuple[str, int] | None = None  # the CONNECT target once intercepted
        self.idle = False  # waiting for a request head (safe to close on drain)
        self.head_sent = False
        self.task = asyncio.current_task()
        self.proxy_user: str | None = None  # the CONNECT's Proxy-Authorization user (names the caller)

    def __repr__(self) -> str:
        return f"ClientConn(peer={self.peer}, target={self.target}, idle={self.idle})"
