"""FakeProviderThread: a FakeProvider on its own event loop in a daemon thread."""

from __future__ import annotations

import asyncio
import inspect
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .provider import FakeProvider, ReceivedRequest


class FakeProviderThread:
    """A FakeProvider on its own event loop in a daemon thread (for sync tests).

    Reads (``received``, ``last()``, ``headers_seen()``) are safe from any thread;
    anything touching asyncio objects goes through ``call(fn)``, which runs
    ``fn(provider)`` on the fake's loop (awaiting it if it returns an awaitable)
    and returns the result.
    """

    def __init__(self, *, hostname: str = "localhost", expected_key: str | None = None) -> None:
        self.provider = FakeProvider(hostname=hostname, expected_key=expected_key)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> FakeProviderThread:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="fake-provider", daemon=True)
        self._thread.start()
        self.call(lambda p: p.start())
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self.call(lambda p: p.close())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
            if not thread.is_alive():
                loop.close()
            self._loop = self._thread = None

    def __enter__(self) -> FakeProviderThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, fn: Callable[[FakeProvider], Any], timeout: float = 60.0) -> Any:
        if self._loop is None:
            raise RuntimeError("FakeProviderThread is not running")

        async def run() -> Any:
            result = fn(self.provider)
            if inspect.isawaitable(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    # same surface as FakeProvider --------------------------------------------------

    @property
    def port(self) -> int:
        return self.provider.port

    @property
    def ca_pem_path(self) -> Path:
        return self.provider.ca_pem_path

    @property
    def base_url(self) -> str:
        return self.provider.base_url

    @property
    def received(self) -> list[ReceivedRequest]:
        return self.provider.received

    def url(self, path: str) -> str:
        return self.provider.url(path)

    def last(self) -> ReceivedRequest:
        return self.provider.last()

    def headers_seen(self, name: str) -> list[str]:
        return self.provider.headers_seen(name)

    def client_ssl_context(self) -> ssl.SSLContext:
        return self.provider.client_ssl_context()

    @property
    def expected_key(self) -> str | None:
        return self.provider.expected_key

    @expected_key.setter
    def expected_key(self, value: str | None) -> None:
        self.call(lambda p: setattr(p, "expected_key", value))

    @property
    def stream_delay(self) -> float:
        return self.provider.stream_delay

    @stream_delay.setter
    def stream_delay(self, value: float) -> None:
        self.call(lambda p: setattr(p, "stream_delay", value))

    def arm_gate(self) -> None:
        """Install a fresh closed gate: SSE streams pause after their first event."""
        self.call(lambda p: p.arm_gate())

    def release_gate(self) -> None:
        self.call(lambda p: p.release_gate())

    def hold_requests(self) -> None:
        """Every request waits (after its body) until ``release_requests``."""
        self.call(lambda p: setattr(p, "hold", asyncio.Event()))

    def release_requests(self) -> None:
        def release(p: FakeProvider) -> None:
            if p.hold is not None:
                p.hold.set()
            p.hold = None

        self.call(release)

    def disarm_gate(self) -> None:
        self.call(lambda p: setattr(p, "stream_gate", None))
