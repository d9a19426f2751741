"""Audit log: one JSON line per finished request, to stdout or a rotated file.

What is written is decided here, on the event loop, into a dict of plain
values (str, int, float, bool, None, lists and dicts of those), so the
``default=str`` fallback of ``json.dumps`` never meets an object whose
``str()`` could hold a secret. Headers are never logged (they carry
credentials); query parameters and JSON body fields with credential-like
names are replaced by ``REDACTED``; errors are logged by their code only.

Writing happens off the loop: the hooks put a finished line on a bounded
queue and a ``logging.handlers.QueueListener`` thread hands it to the handler
(``RotatingFileHandler`` for a path, ``StreamHandler`` for stdout). When the
queue is full the line is dropped and counted, rather than stall requests on
a slow disk. No logger is involved, so two AuditLogs never share state.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import math
import os
import queue
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_plus, urlsplit

from proxy.flow import Flow

log = logging.getLogger("sidekey.audit")

REDACTED = "REDACTED"
TRUNCATED = "…(truncated)"
# Compared after unquoting, lower-casing and "-" -> "_", so "API-Key" matches too.
SECRET_QUERY_PARAMS = frozenset(
    {"key", "api_key", "apikey", "token", "access_token", "secret", "password", "signature", "sig"}
)
SECRET_BODY_KEYS = frozenset(
    {
        "api_key", "apikey", "key", "token", "secret", "password", "authorization",
        "access_token", "refresh_token", "client_secret",
    }
)  # fmt: skip
MAX_QUEUED = 10_000  # lines waiting for the writer thread; past this, drop and count


def _norm(name: str) -> str:
    return unquote_plus(name).lower().replace("-", "_")


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
        return {k: REDACTED if _norm(k) in SECRET_BODY_KEYS else _redact_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_json(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


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
    ) -> None:
        if max_bytes < 0 or backups < 0 or max_body_log < 0:
            raise ValueError("audit: max_bytes, backups and max_body_log must not be negative")
        if max_bytes > 0 and backups == 0:
            # RotatingFileHandler would reopen the same file and never shrink it.
            raise ValueError("audit: rotation by size needs at least one backup")
        self.sink = sink
        self.log_bodies = log_bodies
        self.max_body_log = max_body_log
        self.clock = clock
        self._queued = 0
        self._dropped = 0
        self._handler: logging.Handler
        if sink == "-":
            self._handler = logging.StreamHandler(sys.stdout)
        else:
            self._create_private(sink)  # before the handler opens it in append mode
            rotating = logging.handlers.RotatingFileHandler(
                sink, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
            )
            rotating.rotator = self._rotate
            self._handler = rotating
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._queue: queue.SimpleQueue[logging.LogRecord | None] = queue.SimpleQueue()
        self._listener: logging.handlers.QueueListener | None = logging.handlers.QueueListener(
            self._queue, self._handler
        )
        self._listener.start()

    # -- hooks (observers: they log and carry on, never raise) ------------------
    def response(self, flow: Flow) -> None:
        self._write(flow)

    def error(self, flow: Flow) -> None:
        self._write(flow)

    def done(self) -> None:
        """Drain the queue and close the file. Runs once, at shutdown."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        listener.stop()  # the writer thread finishes what is queued, then exits
        self._handler.close()

    def statistics(self) -> dict[str, Any]:
        return {"sink": self.sink, "queued": self._queued, "dropped": self._dropped, "pending": self._queue.qsize()}

    def __repr__(self) -> str:
        return f"AuditLog(sink={self.sink!r}, queued={self._queued}, dropped={self._dropped})"

    # -- the pure part ------------------------------------------------------------
    def record(self, flow: Flow) -> dict[str, Any]:
        req = flow.request
        start, end = flow.timings.get("start"), flow.timings.get("end")
        status = flow.response.status if flow.response else (flow.error.status if flow.error else None)
        now = datetime.fromtimestamp(self.clock(), tz=UTC)
        entry: dict[str, Any] = {
            "time": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "request_id": flow.id,
            "client": self._client(flow.client_address),
            "method": req.method,
            "host": req.host,
            "path": self._path(flow),
            "provider": flow.provider_name,
            "upstream": self._upstream(flow.upstream_url),
            "status": status,
            "duration_ms": round((end - start) * 1000, 1) if start is not None and end is not None else None,
            "attempts": flow.metadata.get("attempts", 1),
            "tokens": flow.metadata.get("usage") or None,
            "cost": flow.metadata.get("cost_usd"),
            "cache": flow.metadata.get("cache"),
            "error": flow.error.code if flow.error else None,
            "bytes_out": flow.bytes_to_client,
            "intercepted": flow.intercepted,
        }
        if self.log_bodies:
            entry["request_body"] = self._body(req.body)
        # Metadata is filled by other addons: keep plain values only, so the
        # default=str fallback can never serialise an arbitrary object.
        return {k: _plain(v) for k, v in entry.items()}

    def _path(self, flow: Flow) -> str:
        path, sep, query = flow.request.path.partition("?")
        if not sep:
            return path
        secret_names = set(SECRET_QUERY_PARAMS)
        auth = flow.provider.auth if flow.provider else None
        if auth is not None and auth.type == "query" and auth.param:
            secret_names.add(_norm(auth.param))
        parts = []
        for part in query.split("&"):
            name, eq, _value = part.partition("=")
            parts.append(f"{name}={REDACTED}" if eq and _norm(name) in secret_names else part)
        return f"{path}?{'&'.join(parts)}"

    @staticmethod
    def _client(address: tuple[str, int] | None) -> str | None:
        if address is None:
            return None
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @staticmethod
    def _upstream(url: str | None) -> str | None:
        """host:port only: no path, no query, no userinfo (any may hold a key)."""
        if not url:
            return None
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
            if self._listener is None:
                return  # after done(): nowhere to write
            if self._queue.qsize() >= MAX_QUEUED:  # the loop is the only producer
                self._dropped += 1
                if self._dropped == 1 or self._dropped % 1000 == 0:
                    log.warning("audit queue full: %d lines dropped", self._dropped)
                return
            line = _dumps(self.record(flow))
            self._queue.put_nowait(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))
            self._queued += 1
        except Exception as exc:  # noqa: BLE001 - an observer must not break the flow
            log.error("audit record failed for flow %s: %s", flow.id, type(exc).__name__)

    @staticmethod
    def _create_private(path: str) -> None:
        """Create (or fix) the file as 0600; fchmod so the umask cannot widen or narrow it."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)

    def _rotate(self, source: str, dest: str) -> None:
        # Called by RotatingFileHandler (writer thread) for base -> .1; the
        # handler then reopens ``source`` in append mode, keeping our mode.
        if os.path.exists(source):
            os.rename(source, dest)
        self._create_private(source)
