"""The memory floor of one idle TLS connection in a Python asyncio server (#17 item 3).

    .venv/bin/python bench/tls_floor.py 1000 uvloop      # or: asyncio, or add --plain for TCP only

A server process (uvloop or the stdlib loop, TLS with a trustme certificate) accepts N
connections whose handler waits for bytes that never come; a client process opens them and
sends 5 bytes each. Prints the server's RSS growth per connection: what any asyncio TLS
server here pays per idle connection before it does anything of its own. sidekey holds two
per stream (the client's, and its pooled upstream connection's).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import resource
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))


def nofile_to_hard() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(sock: socket.socket, pem: str | None, use_uvloop: bool) -> None:
    nofile_to_hard()
    ctx = None
    if pem:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(pem)

    async def idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        await reader.read(100)  # never comes

    async def main() -> None:
        server = await asyncio.start_server(idle, sock=sock, ssl=ctx, backlog=4096)
        async with server:
            await server.serve_forever()

    if use_uvloop:
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


async def connect_all(port: int, n: int, ca: str | None) -> list[asyncio.StreamWriter]:
    ctx = ssl.create_default_context(cafile=ca) if ca else None
    gate = asyncio.Semaphore(50)
    writers: list[asyncio.StreamWriter] = []

    async def one() -> None:
        async with gate:
            _, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="localhost" if ctx else None
            )
            writer.write(b"hello")
            await writer.drain()
            writers.append(writer)

    await asyncio.gather(*(one() for _ in range(n)))
    return writers


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    use_uvloop = "asyncio" not in sys.argv
    plain = "--plain" in sys.argv
    nofile_to_hard()
    import trustme

    with tempfile.TemporaryDirectory() as tmp:
        ca = trustme.CA()
        ca.cert_pem.write_to_path(f"{tmp}/ca.pem")
        ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(f"{tmp}/server.pem")
        sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
        port = sock.getsockname()[1]
        server = multiprocessing.get_context("fork").Process(
            target=serve, args=(sock, None if plain else f"{tmp}/server.pem", use_uvloop), daemon=True
        )
        server.start()
        time.sleep(1)  # the child imports its loop; nothing is measured before the next line
        before = rss_kib(server.pid or 0)
        loop = asyncio.new_event_loop()
        writers = loop.run_until_complete(connect_all(port, n, None if plain else f"{tmp}/ca.pem"))
        loop.run_until_complete(asyncio.sleep(3))
        after = rss_kib(server.pid or 0)
        server.kill()
        for writer in writers:
            writer.transport.abort()
        loop.close()
    kind = "tcp" if plain else "tls"
    print(f"{'uvloop' if use_uvloop else 'asyncio'} {kind}: {n} connections, {(after - before) / n:.1f} KiB each")


if __name__ == "__main__":
    main()
