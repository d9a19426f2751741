"""The response cache under load: its memory bound and how much it answers.

    .venv/bin/python bench/cache_memory.py

1. Fills a memory cache (max_bytes 8 MiB) with 10x its size in distinct
   128 KiB answers and reports the entries, the bytes the store counts and
   the process's resident memory before and after (VmRSS, VmHWM).
2. Sends one chat request 1,600 times from 32 concurrent clients and counts
   the answers by x-sidekey-cache and the requests that reached the upstream.

The upstream is the test suite's fake provider (tests/fakes) over TLS; sidekey
runs as a real process (tests/integration/sidekey_process.py) at INFO (its
start is read from the log).
"""

from __future__ import annotations

import asyncio
import collections
import json
import ssl
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fakes.provider import FakeProviderThread  # noqa: E402
from tests.integration.sidekey_process import SidekeyProcess  # noqa: E402

MAX_BYTES = 8 * 1024 * 1024
ANSWER = 128 * 1024
CLIENTS, REPEATS = 32, 50


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


async def fill(proxy: SidekeyProcess, ctx: ssl.SSLContext) -> None:
    async with httpx.AsyncClient(proxy=proxy.url, verify=ctx, timeout=60) as client:
        for i in range(10 * MAX_BYTES // ANSWER):
            r = await client.get(f"https://api.fake.test/bytes/{ANSWER}?i={i}")
            assert r.status_code == 200 and len(r.content) == ANSWER


async def repeat(proxy: SidekeyProcess, ctx: ssl.SSLContext) -> collections.Counter[str]:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "say hello to me"}]}
    results: collections.Counter[str] = collections.Counter()

    async def worker(client: httpx.AsyncClient) -> None:
        for _ in range(REPEATS):
            r = await client.post("https://api.fake.test/v1/chat/completions", json=body)
            assert r.status_code == 200
            results[r.headers["x-sidekey-cache"]] += 1

    async with httpx.AsyncClient(proxy=proxy.url, verify=ctx, timeout=60,
                                 limits=httpx.Limits(max_connections=CLIENTS)) as client:  # fmt: skip
        await asyncio.gather(*(worker(client) for _ in range(CLIENTS)))
    return results


def main() -> None:
    with FakeProviderThread() as fake, tempfile.TemporaryDirectory() as tmp:
        policy = f"""version: 1
providers:
  fake:
    hosts: [api.fake.test]
    upstream: https://localhost:{fake.port}
    auth: {{type: bearer, secret: env:FAKE_KEY}}
    tls: {{ca_bundle: {fake.ca_pem_path}}}
    cache: {{ttl: 1h, max_bytes: {MAX_BYTES}, max_entry_bytes: 256KiB}}
"""
        proxy = SidekeyProcess(Path(tmp), policy, env={"FAKE_KEY": "k"}, log_level="INFO").start()
        try:
            ctx = ssl.create_default_context(cafile=str(proxy.ca_path))
            asyncio.run(repeat(proxy, ctx))  # warm: imports, pools, TLS contexts
            rss0, hwm0 = status_kib(proxy.pid, "VmRSS"), status_kib(proxy.pid, "VmHWM")
            asyncio.run(fill(proxy, ctx))
            rss1, hwm1 = status_kib(proxy.pid, "VmRSS"), status_kib(proxy.pid, "VmHWM")
            stats = httpx.get(proxy.admin_url + "/cache/stats", trust_env=False).json()["providers"]["fake"]
            print(
                f"fill: {10 * MAX_BYTES // ANSWER} answers of {ANSWER // 1024} KiB = 10 x max_bytes "
                f"({MAX_BYTES // 1024} KiB)"
            )
            print(
                f"  store: {stats['entries']} entries, {stats['bytes']} bytes counted (<= {stats['max_bytes']}), "
                f"{stats['evictions']} evictions"
            )
            print(
                f"  process: VmRSS {rss0} -> {rss1} KiB (+{rss1 - rss0}), VmHWM {hwm0} -> {hwm1} KiB "
                f"(+{hwm1 - hwm0}); overhead over max_bytes: {rss1 - rss0 - MAX_BYTES // 1024} KiB"
            )
            before = sum(1 for r in fake.received if r.path == "/v1/chat/completions")
            results = asyncio.run(repeat(proxy, ctx))
            upstream = sum(1 for r in fake.received if r.path == "/v1/chat/completions") - before
            total = sum(results.values())
            print(
                f"repeat: {total} identical chat requests, {CLIENTS} concurrent: {dict(results)}; "
                f"upstream calls {upstream}; from the cache {100 * (total - upstream) / total:.1f}%"
            )
            print(json.dumps(stats))
        finally:
            proxy.stop()


if __name__ == "__main__":
    main()
