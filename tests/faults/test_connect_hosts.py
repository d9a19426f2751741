"""2,000 and more distinct hosts through CONNECT: the leaf certificate cache
stays at its bound (2,048) and memory stops growing with it.

Every host is intercepted. ``*.many.test`` goes to one fixed upstream: each
host is a leaf minted, a TLS handshake with sidekey and a request served.
After the cache is full, more new hosts evict old leaves: RSS over that
stretch must stay flat (within the slack a Python heap's fragmentation
takes). ``*.follow.invalid`` follows the CONNECT target (a pool per host, as
``*.openai.azure.com`` would), to names that do not resolve: each is a 502,
and the pools must not pile up (each held its own TLS context, the whole
system store: 500 such hosts took RSS from 66 to 505 MB).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

from tests.faults.conftest import StartProxy, assert_clean_after, curl_status, fault_policy
from tests.faults.fault_upstream import FaultUpstream
from tests.faults.leaks import assert_back_to, holdings
from tests.integration.sidekey_process import SidekeyProcess

CACHE = 2048  # proxy/leaf_contexts.py LeafContexts max_entries
FILL = 2_100  # distinct hosts: more than the cache holds
MORE = 500  # further new hosts once it is full: each a mint and an eviction
FOLLOW = 500  # hosts of the provider that follows the CONNECT target
CONCURRENCY = 8


def rss_kib(proxy: SidekeyProcess) -> int:
    for line in Path(f"/proc/{proxy.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def metric(proxy: SidekeyProcess, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(proxy.admin_url + "/metrics", timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} missing")


async def visit(port: int, ctx: ssl.SSLContext, host: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            return head
        await writer.start_tls(ctx, server_hostname=host)
        writer.write(f"GET /ok HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return await reader.read()
    finally:
        writer.close()


async def visit_all(port: int, ctx: ssl.SSLContext, hosts: list[str]) -> list[bytes]:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(host: str) -> bytes:
        async with gate:
            async with asyncio.timeout(60):
                return await visit(port, ctx, host)

    return await asyncio.gather(*(one(h) for h in hosts))


def test_thousands_of_connect_hosts_keep_the_leaf_cache_and_memory_bounded(
    start_proxy: StartProxy, fault: FaultUpstream, stalled: FaultUpstream
) -> None:
    policy = fault_policy(fault, stalled).replace("hosts: [faulty.test]", 'hosts: [faulty.test, "*.many.test"]')
    policy += """\
  follow:
    hosts: ["*.follow.invalid"]
    auth: {type: bearer, secret: env:OPENAI_API_KEY}
    retry: {attempts: 1}
"""
    proxy = start_proxy(policy)
    assert curl_status(proxy, "https://faulty.test/ok")[0] == "200"
    baseline = assert_back_to(proxy, holdings(proxy))
    ctx = proxy.client_ssl_context()
    rss = {"start": rss_kib(proxy)}
    answers = asyncio.run(visit_all(proxy.port, ctx, [f"h{i}.many.test" for i in range(FILL)]))
    rss["full"] = rss_kib(proxy)
    assert metric(proxy, "sidekey_leaf_certs_cached") == CACHE
    answers += asyncio.run(visit_all(proxy.port, ctx, [f"m{i}.many.test" for i in range(MORE)]))
    rss["more"] = rss_kib(proxy)
    assert [a[:80] for a in answers if not a.startswith(b"HTTP/1.1 200")] == []
    followed = asyncio.run(visit_all(proxy.port, ctx, [f"f{i}.follow.invalid" for i in range(FOLLOW)]))
    rss["follow"] = rss_kib(proxy)
    assert {a.split(b"\r\n", 1)[0] for a in followed} == {b"HTTP/1.1 502 upstream_connect_error"}
    assert metric(proxy, "sidekey_leaf_certs_cached") == CACHE
    assert metric(proxy, "sidekey_leaf_certs_minted_total") >= FILL + MORE + FOLLOW
    print(f"RSS KiB: {rss}")  # the numbers docs/reliability.md quotes
    assert rss["more"] <= rss["full"] * 1.05, rss  # evicting, not growing
    assert rss["follow"] <= rss["more"] * 1.10, rss  # was +880 KiB a host
    assert_clean_after(proxy, baseline)
    deadline = time.monotonic() + 20  # pools without a connection close at the second upkeep
    while (pools := metric(proxy, 'sidekey_upstream_pools{state="active"}')) > 2:
        assert time.monotonic() < deadline, f"{pools:.0f} upstream pools left"
        time.sleep(0.1)
