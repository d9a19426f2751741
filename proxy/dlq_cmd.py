"""``sidekey dlq list`` and ``sidekey dlq replay``: read the dead-letter file
and send a stored request again through the running sidekey."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.dlq_store import ReplayRequest


def cmd_dlq_list(path: str, limit: int, as_json: bool) -> int:
    import itertools
    import json

    from proxy.dlq_store import DeadLetterFile, table

    store = DeadLetterFile(path)
    letters = list(itertools.islice(store.letters(), limit or None))
    if as_json:
        for letter in letters:
            print(json.dumps({**letter.entry, "replayed": letter.replay}, ensure_ascii=False))
    elif letters:
        print("\n".join(table(letters)))
    else:
        print(f"{path}: no dead letters", file=sys.stderr)
    if store.skipped:
        print(f"{path}: skipped {store.skipped} unreadable lines", file=sys.stderr)
    return 0


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    """Send a stored request again through the running sidekey, which injects
    the real credential (the entry holds none). Exit 0 on a 2xx answer."""
    import time

    from proxy.dlq_store import DeadLetterFile, replay_request

    store = DeadLetterFile(args.dlq)
    letter = store.find(args.id)
    if letter is None:
        print(f"{args.dlq}: no dead letter {args.id}", file=sys.stderr)
        return 2
    request = replay_request(letter.entry, without_body=args.without_body)
    if isinstance(request, str):
        print(f"refusing to replay: {request}", file=sys.stderr)
        return 2
    ca = Path(args.certs) / "sidekey-ca.pem"
    if not ca.is_file():
        print(f"{ca}: no sidekey CA certificate (pass --certs DIR)", file=sys.stderr)
        return 2
    import aiohttp

    try:
        status, new_id = asyncio.run(_send_replay(request, args.proxy, ca, args.timeout))
    except (aiohttp.ClientError, OSError, TimeoutError) as err:  # the type only: a message may quote the URL
        print(f"replay of {args.id} failed: {type(err).__name__}", file=sys.stderr)
        return 1
    store.mark_replayed(args.id, status, new_id, time.time())
    print(f"replayed {args.id}: {status} (x-sidekey-request-id {new_id or '-'})")
    return 0 if 200 <= status < 300 else 1


async def _send_replay(request: ReplayRequest, proxy: str, ca: Path, seconds: float) -> tuple[int, str | None]:
    import ssl

    import aiohttp
    from yarl import URL

    context = ssl.create_default_context(cafile=str(ca))  # verification on: sidekey's CA only
    async with aiohttp.ClientSession(trust_env=False, auto_decompress=False) as session:
        async with session.request(
            request.method, URL(request.url, encoded=True), headers=request.headers, data=request.body,
            proxy=proxy, ssl=context, timeout=aiohttp.ClientTimeout(total=seconds),
        ) as resp:  # fmt: skip
            await resp.read()
            return resp.status, resp.headers.get("x-sidekey-request-id")
