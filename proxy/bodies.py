"""Reading a request body from the caller, streamed, bounded and timed.

Small bodies (the usual JSON prompt) are read whole before forwarding: one
upstream write, and later addons (retries, token estimates) can look at
them. Larger ones are handed to aiohttp as an async iterator of pieces, so a
1 GiB upload moves through with a few 64 KiB buffers in memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from proxy.errors import BadRequest, BodyTooLarge, ProxyError, RequestTimeout
from proxy.http1 import parse_chunk_size

PIECE = 65536
MAX_TRAILER_LINES = 64


class BodyReader:
    """One request body. ``complete`` tells the connection loop whether the
    body was fully consumed (if not, the connection cannot be reused);
    ``error`` keeps why reading failed, since aiohttp only reports that the
    upload broke."""

    __slots__ = ("_reader", "_kind", "_remaining", "_max", "_timeout", "_on_start", "complete", "error", "received")

    def __init__(
        self,
        reader: asyncio.StreamReader,
        kind: str,
        length: int,
        *,
        max_bytes: int,
        timeout: float,
        on_start: bytes | None = None,
        write: asyncio.StreamWriter | None = None,
    ) -> None:
        self._reader = reader
        self._kind = kind
        self._remaining = length
        self._max = max_bytes
        self._timeout = timeout
        # "100 Continue" is sent when we start reading (RFC 9110 §10.1.1).
        self._on_start = (on_start, write) if on_start and write else None
        self.complete = kind == "none"
        self.error: ProxyError | None = None
        self.received = 0

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def length(self) -> int:
        """Bytes still to read for a Content-Length body; -1 when chunked."""
        return self._remaining if self._kind == "length" else -1

    def _start(self) -> None:
        if self._on_start is not None:
            data, writer = self._on_start
            self._on_start = None
            writer.write(data)

    async def read_all(self) -> bytes:
        self._start()
        if self._kind == "length":
            data = await self._timed(self._reader.readexactly(self._remaining))
            self.received = len(data)
            self._remaining = 0
            self.complete = True
            return data
        return b"".join([piece async for piece in self.iterate()])

    async def iterate(self) -> AsyncIterator[bytes]:
        self._start()
        try:
            if self._kind == "length":
                while self._remaining:
                    piece = await self._timed(self._reader.read(min(self._remaining, PIECE)))
                    if not piece:
                        raise BadRequest(reason="client closed before sending the whole body")
                    self._remaining -= len(piece)
                    self.received += len(piece)
                    yield piece
            elif self._kind == "chunked":
                async for piece in self._chunks():
                    yield piece
            self.complete = True
        except ProxyError as exc:
            self.error = exc
            raise
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self.error = BadRequest(reason="client closed before sending the whole body")
            raise self.error from exc

    async def _chunks(self) -> AsyncIterator[bytes]:
        reader = self._reader
        while True:
            size = parse_chunk_size(await self._timed(reader.readuntil(b"\r\n")))
            if size == 0:
                break
            if self.received + size > self._max:
                raise BodyTooLarge(limit=self._max)
            while size:
                piece = await self._timed(reader.readexactly(min(size, PIECE)))
                size -= len(piece)
                self.received += len(piece)
                yield piece
            if await self._timed(reader.readexactly(2)) != b"\r\n":
                raise BadRequest(reason="chunk not followed by CRLF")
        # Trailer fields are read and dropped: we forward no trailers.
        for _ in range(MAX_TRAILER_LINES):
            if await self._timed(reader.readuntil(b"\r\n")) == b"\r\n":
                return
        raise BadRequest(reason="too many trailer fields")

    async def _timed(self, aw: asyncio.Future[bytes] | asyncio.Task[bytes] | object) -> bytes:
        try:
            async with asyncio.timeout(self._timeout):
                return await aw  # type: ignore[misc, no-any-return]
        except TimeoutError:
            raise RequestTimeout() from None
        except asyncio.LimitOverrunError:
            raise BadRequest(reason="chunk size line too long") from None
        except asyncio.IncompleteReadError:
            raise BadRequest(reason="client closed before sending the whole body") from None
