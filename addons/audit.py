"""Audit log: one JSON line per finished request, to stdout or a rotated file.

What is written is decided here, on the event loop, into a dict of plain
values (str, int, float, bool, None, lists and dicts of those), so the
``default=str`` fallback of ``json.dumps`` never meets an object whose
``str()`` could hold a secret. Headers are never logged (they carry
credentials); query parameters and JSON body fields with credential-like
names are replaced by ``REDACTED``; errors are logged by their code only.

Writing happens off the loop and in batches: the hooks append a finished
line to a bounded buffer; a task started in ``running`` hands the whole
buffer to a worker thread every ``flush_interval`` seconds (one thread hop per
batch, not per line: a per-line hand-off cost more CPU than the proxying).
When the buffer is full the line is dropped and counted rather than stall
requests on a slow disk. ``done`` writes what is left: it asks the task to
stop and waits for it rather than cancel it, since a batch cancelled while its
worker thread writes was lost (the thread met a file ``done`` had closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from addons.record_sink import (
    SECRET_QUERY_PARAMS,
    FileSink,
    Losses,
    StdoutSink,
    WriteFailed,
    check_sizes,
    normalize_name,
    reason_of,
)
from proxy.flow import Flow
from proxy.logs import UtcTime

log = logging.getLogger("sidekey.audit")

REDACTED = "REDACTED"
TRUNCATED = "…(truncated)"
SECRET_BODY_KEYS = frozenset(
    {
        "api_key", "apikey", "key", "token", "secret", "password", "authorization",
        "access_token", "refresh_token", "client_secret",
    }
)  # fmt: skip
MAX_QUEUED = 10_000  # lines waiting for the writer; past this, drop and count


def _plain(value: Any) -> Any:
    """Keep only JSON-native values; anything else becomes None (never str())."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if isinstance(k, str)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return None


def _redact_json(value: Any) -> Any:
    """Replace values under credential-like keys, at any depth (lists too)."""
    if isinstance(value, dict):
        return {k: REDACTED if normalize_name(k) in SECRET_BODY_KEYS else _redact_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_json(v) for v in value]
    return value


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)
# The string escaper JSONEncoder itself uses when ensure_ascii is False.
_q: Callable[[str], str] = json.encoder.encode_basestring


# Metadata the fast line formats itself; any other key takes the dict path.
_FAST_KEYS = frozenset({"attempts", "usage", "cost", "failures", "estimate", "reserve", "priced_model"})


def _opt(value: str | None) -> str:
    return "null" if value is None else _q(value)


def _tokens(usage: Any) -> dict[str, Any] | None:
    """The usage addon's Usage as plain numbers (never the object itself)."""
    if usage is None:
        return None
    return {
        "input": usage.input, "output": usage.output, "cached_input": usage.cached_input,
        "reasoning": usage.reasoning, "estimated": usage.estimated, "model": usage.model,
    }  # fmt: skip


def _dumps(value: Any) -> str:
    return _ENCODER.encode(value)


class AuditLog:
    name = "audit"

    def __init__(
        self,
        sink: str = "-",
        *,
        max_bytes: int = 100 * 1024**2,
        backups: int = 5,
        log_bodies: bool = False,
        max_body_log: int = 4096,
        clock: Callable[[], float] = time.time,
        flush_interval: float = 0.25,
    ) -> None:
        check_sizes("audit", {"max_bytes": max_bytes, "backups": backups, "max_body_log": max_body_log})
        self.sink = sink
        self.log_bodies = log_bodies
        self.max_body_log = max_body_log
        self.clock = clock
        self.flush_interval = flush_interval
        self._queued = 0
        self._dropped = 0
        self.losses = Losses("audit lines", "sidekey_audit_lines_lost_total", log)
        self._buffer: list[str] = []
        self._out: FileSink | StdoutSink | None = StdoutSink() if sink == "-" else FileSink(sink, max_bytes, backups)
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._upstreams: dict[str, str | None] = {}
        self._time = UtcTime()  # RFC 3339 UTC with milliseconds

    # -- hooks (observers: they log and carry on, never raise) ------------------
    def response(self, flow: Flow) -> None:
        self._write(flow)

    def error(self, flow: Flow) -> None:
        self._write(flow)

    def websocket_start(self, flow: Flow) -> None:
        self._write(flow)  # the session's first line; its end is written by response/error

    def running(self) -> None:
        self._task = asyncio.create_task(self._flush_loop(), name="sidekey-audit-flush")

    async def _flush_loop(self) -> None:
        """Write the buffer every ``flush_interval`` seconds until ``done`` sets
        ``_stopping``; then once more, and return."""
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.flush_interval)
            if self._buffer and self._out is not None:
                lines, self._buffer = self._buffer, []
                try:
                    await asyncio.to_thread(self._out.write, lines)
                except OSError as exc:  # a full disk must not stop the proxy: counted, said once
                    lost = exc.lost if isinstance(exc, WriteFailed) else len(lines)
                    self.losses.failed(lost, reason_of(exc) if not isinstance(exc, WriteFailed) else exc.reason)
                else:
                    self.losses.succeeded()

    async def done(self) -> None:
        """Write what is buffered and close the sink. Runs once, at shutdown."""
        task, self._task = self._task, None
        if task is not None:
            # Not cancelled: a batch being written in the worker thread is finished first.
            self._stopping.set()
            await task
        out, self._out = self._out, None
        if out is None:
            return
        lines, self._buffer = self._buffer, []
        await asyncio.to_thread(self._close, out, lines)

    @staticmethod
    def _close(out: FileSink | StdoutSink, lines: list[str]) -> None:
        try:
            with contextlib.suppress(OSError):
                out.write(lines)
        finally:
            out.close()

    def statistics(self) -> dict[str, Any]:
        return {"sink": self.sink, "queued": self._queued, "dropped": self._dropped, "pending": len(self._buffer),
                "lost": self.losses.total}  # fmt: skip

    def __repr__(self) -> str:
        return f"AuditLog(sink={self.sink!r}, queued={self._queued}, dropped={self._dropped})"

    # -- the pure part ------------------------------------------------------------
    def record(self, flow: Flow) -> dict[str, Any]:
        req = flow.request
        meta = flow.metadata
        entry: dict[str, Any] = {
            "time": self._time(self.clock()),
            "request_id": flow.id,
            "client": self._client(flow.client_address),
            "method": req.method,
            "host": req.host,
            "path": self._path(flow),
            "provider": flow.provider_name,
            "upstream": self._upstream(flow.upstream_url),
            "status": flow.status,
            "duration_ms": flow.duration_ms,
            # Filled by other addons: only plain values pass, so the default=str
            # fallback can never serialise an arbitrary object.
            "attempts": _plain(meta.get("attempts", 1)) if meta else 1,
            "tokens": _tokens(meta.get("usage")) if meta else None,
            "cost": _plain(meta.get("cost")) if meta else None,
            "cache": _plain(meta.get("cache")) if meta else None,
            "error": flow.error.code if flow.error else None,
            "bytes_out": flow.bytes_to_client,
            "intercepted": flow.intercepted,
        }
        if meta and "websocket" in meta:  # a WebSocket session: open, or its summary at close
            entry["websocket"] = _plain(meta["websocket"])
        if self.log_bodies:
            entry["request_body"] = self._body(req.body)
        return entry

    def line(self, flow: Flow) -> str:
        """``record`` serialised. The common case (no bodies, no metadata from
        other addons) is formatted directly: building and encoding a dict per
        request was most of this addon's cost. A test keeps both paths
        byte-identical."""
        meta = flow.metadata
        if self.log_bodies or (meta and not meta.keys() <= _FAST_KEYS):
            return _dumps(self.record(flow))
        attempts, tokens, cost = 1, "null", "null"
        if meta:  # what the forwarder and the usage addon leave: formatted here, not via a dict
            attempts = meta.get("attempts", 1)
            usage = meta.get("usage")
            if usage is not None:
                tokens = "".join((
                    '{"input":', str(usage.input), ',"output":', str(usage.output),
                    ',"cached_input":', str(usage.cached_input), ',"reasoning":', str(usage.reasoning),
                    ',"estimated":', "true" if usage.estimated else "false", ',"model":', _opt(usage.model), "}",
                ))  # fmt: skip
            value = meta.get("cost")
            if isinstance(value, float) and math.isfinite(value):
                cost = float.__repr__(value)
            elif isinstance(value, int) and not isinstance(value, bool):
                cost = str(value)
            if type(attempts) is not int:
                return _dumps(self.record(flow))
        req, status, duration = flow.request, flow.status, flow.duration_ms
        return "".join(
            (
                '{"time":', _q(self._time(self.clock())),
                ',"request_id":', _q(flow.id),
                ',"client":', _opt(self._client(flow.client_address)),
                ',"method":', _q(req.method),
                ',"host":', _q(req.host),
                ',"path":', _q(self._path(flow)),
                ',"provider":', _opt(flow.provider_name),
                ',"upstream":', _opt(self._upstream(flow.upstream_url)),
                ',"status":', "null" if status is None else str(int(status)),
                ',"duration_ms":', "null" if duration is None else float.__repr__(duration),
                ',"attempts":', str(attempts), ',"tokens":', tokens, ',"cost":', cost, ',"cache":null',
                ',"error":', _opt(flow.error.code if flow.error else None),
                ',"bytes_out":', str(int(flow.bytes_to_client)),
                ',"intercepted":', "true" if flow.intercepted else "false",
                "}",
            )
        )  # fmt: skip

    def _path(self, flow: Flow) -> str:
        path, sep, query = flow.request.path.partition("?")
        if not sep:
            return path
        secret_names = set(SECRET_QUERY_PARAMS)
        auth = flow.provider.auth if flow.provider else None
        if auth is not None and auth.type == "query" and auth.param:
            secret_names.add(normalize_name(auth.param))
        parts = []
        for part in query.split("&"):
            name, eq, _value = part.partition("=")
            parts.append(f"{name}={REDACTED}" if eq and normalize_name(name) in secret_names else part)
        return f"{path}?{'&'.join(parts)}"

    @staticmethod
    def _client(address: tuple[str, int] | None) -> str | None:
        if address is None:
            return None
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _upstream(self, url: str | None) -> str | None:
        """host:port only: no path, no query, no userinfo (any may hold a key).
        Cached by scheme and authority: urlsplit per request is measurable."""
        if not url:
            return None
        scheme, sep, rest = url.partition("://")
        cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
        key = scheme + sep + rest[:cut]
        if key in self._upstreams:
            return self._upstreams[key]
        found = self._parse_upstream(key)
        if len(self._upstreams) < 1024:
            self._upstreams[key] = found
        return found

    @staticmethod
    def _parse_upstream(url: str) -> str | None:
        try:
            parts = urlsplit(url)
            host, port = parts.hostname, parts.port
        except ValueError:
            return None
        if host is None:
            return None
        port = port or (443 if parts.scheme == "https" else 80)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _body(self, body: object) -> Any:
        if not isinstance(body, bytes) or not body:
            return None  # streamed (an async iterator) or empty: nothing to show
        try:
            redacted = _redact_json(json.loads(body))  # json.loads gives plain values only
            text = _dumps(redacted)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deep
            return {"size": len(body)}
        if len(text) > self.max_body_log:
            return text[: self.max_body_log] + TRUNCATED
        return redacted

    # -- output ----------------------------------------------------------------------
    def _write(self, flow: Flow) -> None:
        try:
            if self._out is None:
                return  # after done(): nowhere to write
            if len(self._buffer) >= MAX_QUEUED:
                self._dropped += 1
                if self._dropped == 1 or self._dropped % 1000 == 0:
                    log.warning("audit queue full: %d lines dropped", self._dropped)
                return
            self._buffer.append(self.line(flow))
            self._queued += 1
        except Exception as exc:  # noqa: BLE001 - an observer must not break the flow
            log.error("audit record failed for flow %s: %s", flow.id, type(exc).__name__)
