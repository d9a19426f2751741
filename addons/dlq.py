"""Dead-letter queue: requests that failed after all retries and fallbacks,
kept in a durable JSONL file so they can be listed and replayed later
(``sidekey dlq list|replay``; reading lives in ``proxy.dlq_store``).

What counts as a dead letter: a request to a matched provider that ended with
an upstream-side failure (an ``upstream_*`` error or ``circuit_open``), or
with an upstream answer whose status the provider's retry policy retries
(429, 5xx: the failure outlived every attempt). Refusals of our own (a
missing credential, a bad request, a limit) and a caller that went away are
not: nothing upstream failed.

The security property: at hook time ``flow.request.headers`` already holds
the *real* injected credential. An entry keeps headers only after removing
every credential-carrying one (the caller credential headers, every
provider's auth header and ``set_headers`` -- after a failover the request
carries the fallback's key --, cookies, and any name that mentions auth,
token, key, secret, password, signature or cookie); the URL is the caller's
(never ``flow.upstream_url``, which carries an injected query key) with
secret-named query parameters removed. Errors are kept by code only. A
replay through sidekey gets the real credential injected again.

A failover rewrites the request for the fallback (model in the body, its
headers); for providers with fallbacks the ``request`` hook keeps the
caller's version until the flow ends, so a replay sends what was asked.

Writing is batched off the loop like ``addons.audit``: hooks append a
finished line to a bounded buffer; a task writes the batch in a worker
thread and fsyncs, at most once per ``flush_interval``. Files rotate by size
(``path`` -> ``path.1`` -> ... -> ``path.N``), mode 0600. ``done`` asks that
task to stop and waits for it rather than cancel it: a cancel while the worker
thread writes would leave lines in the file that ``written`` never counts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from multidict import CIMultiDict

from addons.record_sink import (
    SECRET_QUERY_PARAMS,
    FileSink,
    Losses,
    WriteFailed,
    check_sizes,
    normalize_name,
    reason_of,
)
from proxy.flow import Body, Flow
from proxy.policy import CALLER_CREDENTIAL_HEADERS
from proxy.routing import format_authority

log = logging.getLogger("sidekey.dlq")

# A header whose name contains one of these is never stored, whatever its value.
SECRET_HEADER_WORDS = ("auth", "token", "key", "secret", "password", "signature", "cookie")
# Query names (normalised by record_sink.normalize_name) ending like these are removed too:
# refresh_token, client_secret, x_amz_signature, ...
SECRET_QUERY_SUFFIXES = ("_key", "_token", "_secret", "signature", "password")
# Values allowed in an attempt record: fixed codes and names, never a message.
_CODE = re.compile(r"[A-Za-z0-9_.:\-]{1,128}\Z")
ATTEMPT_FIELDS = ("provider", "upstream", "status", "error")
MAX_PENDING_BYTES = 32 * 1024**2  # lines waiting for the writer; past this, drop and count
MAX_ORIGINALS = 10_000  # requests kept as sent while a failover may rewrite them (about: in flight)


def is_dead_letter(flow: Flow) -> bool:
    provider = flow.provider
    if provider is None:
        return False  # unmatched traffic is not ours to keep
    if flow.error is not None:
        code = flow.error.code
        return code.startswith("upstream_") or code == "circuit_open"
    resp = flow.response
    # A local answer (ours, or an addon's) carries its body; an upstream one is streamed (body None).
    return resp is not None and resp.body is None and resp.status in provider.retry.statuses


def safe_url(flow: Flow) -> str:
    """The URL the caller addressed, secret-named query parameters removed
    (the query credential of every provider too: a failover may have used any)."""
    req = flow.request
    scheme = "https" if flow.intercepted else "http"
    path, sep, query = req.path.partition("?")
    secret_names = set(SECRET_QUERY_PARAMS)
    secret_names.update(
        normalize_name(p.auth.param) for p in flow.policy.providers if p.auth.type == "query" and p.auth.param
    )
    kept = []
    for part in query.split("&") if sep else ():
        name = normalize_name(part.partition("=")[0])
        if part and name not in secret_names and not name.endswith(SECRET_QUERY_SUFFIXES):
            kept.append(part)
    url = f"{scheme}://{format_authority(req.host, req.port, scheme)}{path}"
    return f"{url}?{'&'.join(kept)}" if kept else url


def safe_headers(flow: Flow, headers: CIMultiDict[str] | None = None) -> list[list[str]]:
    """Request headers as [name, value] pairs, every credential-carrying one
    removed: those of every provider in the policy, since after a failover the
    request carries the fallback's credential."""
    drop = {*CALLER_CREDENTIAL_HEADERS, "cookie"}
    for provider in flow.policy.providers:
        drop.update(provider.strip_headers)
        drop.add(provider.auth.header.lower())
        # sidekey sets these again on replay; an operator may have put a secret in one.
        drop.update(name.lower() for name, _ in provider.set_headers)
    kept = []
    for name, value in (flow.request.headers if headers is None else headers).items():
        low = name.lower()
        if low not in drop and not any(word in low for word in SECRET_HEADER_WORDS):
            kept.append([name, value])
    return kept


def _attempt(record: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in ATTEMPT_FIELDS:
        value = record.get(field)
        if (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and _CODE.match(value)):
            out[field] = value
    return out


def attempts(flow: Flow, status: int | None) -> list[dict[str, Any]]:
    """The forwarder's ``failures`` (one dict per failed attempt), only fixed
    fields with code-like values kept; else one record for the final outcome."""
    failures = flow.metadata.get("failures")
    if isinstance(failures, list) and failures:
        return [_attempt(f) for f in failures if isinstance(f, dict)]
    outcome: dict[str, Any] = {"provider": flow.provider_name}
    if flow.error is not None:
        outcome["error"] = flow.error.code
    else:
        outcome["status"] = status
    return [outcome]


class DeadLetters:
    name = "dlq"

    def __init__(
        self,
        path: str,
        *,
        max_body_bytes: int = 65536,
        max_bytes: int = 64 * 1024**2,
        backups: int = 3,
        flush_interval: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        check_sizes("dlq", {"max_body_bytes": max_body_bytes, "max_bytes": max_bytes, "backups": backups})
        self.path = path
        self.max_body_bytes = max_body_bytes
        self.flush_interval = flush_interval
        self.clock = clock
        self._sink: FileSink | None = FileSink(path, max_bytes, backups, durable=True)
        self._buffer: list[str] = []
        self._pending_bytes = 0
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._originals: dict[str, tuple[CIMultiDict[str], Body]] = {}  # flow id -> request before failover
        self._written = 0
        self._dropped = 0
        self.losses = Losses("dead-letter entries", "sidekey_dlq_entries_lost_total", log)

    # -- hooks ------------------------------------------------------------------
    def request(self, flow: Flow) -> None:
        """A failover rewrites the request for the fallback (its model in the
        body, its headers); a replay must send the caller's, so keep those for
        providers that have fallbacks, until the flow ends."""
        provider = flow.provider
        if provider is None or not provider.fallbacks:
            return
        if len(self._originals) >= MAX_ORIGINALS:  # a flow that never ended: forget the oldest
            del self._originals[next(iter(self._originals))]
        self._originals[flow.id] = (flow.request.headers.copy(), flow.request.body)

    # Observers from here on: they log and carry on, never raise.
    def response(self, flow: Flow) -> None:
        self._consider(flow)

    def error(self, flow: Flow) -> None:
        self._consider(flow)

    def running(self) -> None:
        self._task = asyncio.create_task(self._flush_loop(), name="sidekey-dlq-flush")

    async def done(self) -> None:
        """Write what is buffered and close the file. Runs once, at shutdown."""
        task, self._task = self._task, None
        if task is not None:
            # Not cancelled: the loop finishes a write in progress (and counts it), then returns.
            self._stopping.set()
            self._wake.set()
            await task
        sink, self._sink = self._sink, None
        if sink is None:
            return
        lines, self._buffer, self._pending_bytes = self._buffer, [], 0
        await asyncio.to_thread(self._close, sink, lines)
        self._written += len(lines)

    def statistics(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "written": self._written,
            "pending": len(self._buffer),
            "dropped": self._dropped,
            "lost": self.losses.total,
        }

    def __repr__(self) -> str:
        return f"DeadLetters(path={self.path!r}, written={self._written}, dropped={self._dropped})"

    # -- the pure part --------------------------------------------------------------
    def record(self, flow: Flow) -> dict[str, Any]:
        """The entry for a dead-letter flow: plain values only, no credential."""
        headers, body = self._originals.pop(flow.id, (flow.request.headers, flow.request.body))
        resp = flow.response
        status = resp.status if resp is not None and resp.body is None else None  # the upstream's, not ours
        now = datetime.fromtimestamp(self.clock(), tz=UTC)
        entry: dict[str, Any] = {
            "id": flow.id,
            "time": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "provider": flow.provider_name,
            "method": flow.request.method,
            "url": safe_url(flow),
            "headers": safe_headers(flow, headers),
        }
        entry.update(self._body(body))
        entry["status"] = status
        entry["error"] = flow.error.code if flow.error is not None else None
        entry["attempts"] = attempts(flow, status)
        return entry

    def _body(self, body: object) -> dict[str, str]:
        if body is None or body == b"":
            return {"body": ""}
        if not isinstance(body, bytes):
            return {"body_omitted": "streamed"}  # sent once from the caller's socket, not kept
        if self.max_body_bytes == 0:
            return {"body_omitted": "disabled"}
        if len(body) > self.max_body_bytes:
            return {"body_omitted": "too_large"}
        try:
            return {"body": body.decode("utf-8")}
        except UnicodeDecodeError:
            return {"body_base64": base64.b64encode(body).decode("ascii")}

    # -- output -------------------------------------------------------------------------
    def _consider(self, flow: Flow) -> None:
        try:
            if self._sink is None or not is_dead_letter(flow):
                self._originals.pop(flow.id, None)
                return
            line = json.dumps(self.record(flow), separators=(",", ":"), ensure_ascii=False)
            if self._pending_bytes + len(line) > MAX_PENDING_BYTES:
                self._dropped += 1
                log.warning("dlq buffer full: entry for flow %s dropped (%d so far)", flow.id, self._dropped)
                return
            self._buffer.append(line)
            self._pending_bytes += len(line)
            self._wake.set()
        except Exception as exc:  # noqa: BLE001 - an observer must not break the flow
            log.error("dlq record failed for flow %s: %s", flow.id, type(exc).__name__)

    async def _flush_loop(self) -> None:
        """Write as soon as there is something, then at most once per interval,
        until ``done`` sets ``_stopping``."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()
            if self._stopping.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.flush_interval)

    async def _flush(self) -> None:
        lines, self._buffer, self._pending_bytes = self._buffer, [], 0
        if not lines or self._sink is None:
            return
        try:
            await asyncio.to_thread(self._sink.write, lines)
        except OSError as exc:  # a full disk must not stop the proxy: counted, said once
            lost = exc.lost if isinstance(exc, WriteFailed) else len(lines)
            self._written += len(lines) - lost
            self.losses.failed(lost, exc.reason if isinstance(exc, WriteFailed) else reason_of(exc))
        else:
            self._written += len(lines)
            self.losses.succeeded()

    @staticmethod
    def _close(sink: FileSink, lines: list[str]) -> None:
        try:
            if lines:
                sink.write(lines)
        finally:
            sink.close()
