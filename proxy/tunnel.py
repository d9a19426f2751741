"""The blind tunnel for unmatched hosts (policy ``unmatched: tunnel``): connect
to an address the network guard checked, then relay bytes both ways. No
interception, no credentials."""

from __future__ import annotations

import asyncio

from proxy import errors, netguard

CONNECT_TIMEOUT = 10.0
PIPE_PIECE = 65536


async def open_checked(
    host: str, port: int, guard: netguard.Guard
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to ``host:port`` at an address the guard allows (never a
    metadata address or sidekey's own ports); our error when there is none."""
    try:
        addresses = await netguard.resolve_checked(host, port, guard)
    except netguard.BlockedAddressError:
        raise errors.AddressBlocked(host=host) from None
    except OSError:
        raise errors.UpstreamConnectError() from None
    for _family, address in addresses:  # connect to the checked address only
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                return await asyncio.open_connection(address, port)
        except (OSError, TimeoutError):
            continue
    raise errors.UpstreamConnectError()


async def relay(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    """Both directions until each side is done; the upstream is closed after."""
    try:
        await asyncio.gather(_pipe(client_reader, up_writer), _pipe(up_reader, client_writer))
    finally:
        up_writer.close()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(PIPE_PIECE):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()  # half-close: the other direction may still flow
    except (ConnectionError, OSError):
        dst.close()
