"""Server-side TLS contexts for intercepted CONNECT hosts: a leaf minted by
sidekey's CA (``proxy.certs``) on a host's first use, in a worker thread, one
mint in flight per host, cached (LRU) as a ready ``ssl.SSLContext``. A
ClientHello whose SNI names another host than the CONNECT target is refused.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from proxy.certs import CertificateAuthority, normalize_host


class LeafContexts:
    """Cache of server-side ``ssl.SSLContext`` per CONNECT host (LRU)."""

    def __init__(self, ca: CertificateAuthority, *, max_entries: int = 2048) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._ca, self._max = ca, max_entries
        self._cache: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[ssl.SSLContext]] = {}
        # load_cert_chain only reads files: stage the PEMs in a private dir
        # (mkdtemp makes it 0700). One mkdir at construction, not per mint.
        self._tmpdir = Path(tempfile.mkdtemp(prefix="sidekey-leaf-"))
        self._closed = False
        self._hits = self._misses = self._mints = self._sni_mismatches = 0
        self._mint_seconds = 0.0

    async def context_for(self, host: str) -> ssl.SSLContext:
        # Fast path: cache keys are normalized, so a host already in that form
        # hits without re-validating it.
        key = host
        ctx = self._cache.get(key)
        if ctx is None:
            key = normalize_host(host)
            ctx = self._cache.get(key)
        if ctx is not None:
            self._cache.move_to_end(key)
            self._hits += 1
            return ctx
        if self._closed:
            raise RuntimeError("LeafContexts is closed")
        self._misses += 1  # every caller not served from cache, incl. those joining a mint
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._mint(key), name=f"sidekey-mint {key}")
            self._inflight[key] = task
        # shield: a waiter cancelled (its client hung up) must not cancel the
        # mint that the other waiters share.
        return await asyncio.shield(task)

    async def _mint(self, key: str) -> ssl.SSLContext:
        try:
            ctx, seconds = await asyncio.to_thread(self._build, key)
        except BaseException:
            del self._inflight[key]
            raise
        # No await between these lines: no caller can see the key in neither map.
        self._mints += 1
        self._mint_seconds += seconds
        self._cache[key] = ctx
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)
        del self._inflight[key]
        return ctx

    def _build(self, key: str) -> tuple[ssl.SSLContext, float]:
        """Worker thread: mint the leaf and load it into a fresh context."""
        start = time.perf_counter()
        chain_pem, key_pem = self._ca.mint_leaf(key)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= ssl.OP_NO_COMPRESSION  # CRIME
        ctx.set_alpn_protocols(["http/1.1"])  # the proxy speaks HTTP/1.1 only
        # mkstemp: O_EXCL and 0600. One file holds chain and key; OpenSSL picks
        # each block by type. Unlinked as soon as OpenSSL has read it.
        fd, path = tempfile.mkstemp(dir=self._tmpdir, suffix=".pem")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(chain_pem + key_pem)
            ctx.load_cert_chain(path)
        finally:
            os.unlink(path)
        ctx.sni_callback = self._sni_check(key)
        return ctx, time.perf_counter() - start

    def _sni_check(self, key: str) -> Callable[[ssl.SSLObject, str | None, ssl.SSLContext], int | None]:
        # A ClientHello naming another host than the CONNECT target means the
        # client would judge our certificate against a name we did not mint:
        # refuse rather than serve a certificate that cannot match.
        def check(_conn: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
            if server_name is None:  # no SNI (IP literal targets): nothing to compare
                return None
            try:
                if normalize_host(server_name) == key:
                    return None
            except ValueError:
                pass
            self._sni_mismatches += 1
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME

        return check

    def statistics(self) -> dict[str, int | float]:
        return {
            "hits": self._hits,
            "misses": self._misses,
            "entries": len(self._cache),
            "mints": self._mints,
            "mint_seconds_total": self._mint_seconds,
            "sni_mismatches": self._sni_mismatches,
        }

    def __repr__(self) -> str:
        return (
            f"<LeafContexts entries={len(self._cache)}/{self._max} hits={self._hits} "
            f"misses={self._misses} in_flight={len(self._inflight)}>"
        )

    def close(self) -> None:
        self._closed = True
        shutil.rmtree(self._tmpdir, ignore_errors=True)
