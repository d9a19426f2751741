"""Access log: one INFO line per finished request, for people and log collectors.

The audit log (``addons.audit``) is the durable record; this line is the
process log's view of the same request: request id, caller, method, host,
path, provider, upstream member, status, duration, attempts and error code,
as structured fields (``proxy.logs`` renders them as ``key=value`` text or
JSON keys). The path keeps the query's parameter names and drops every
value (``/v1/x?key=&q=``): a query may carry a secret (Gemini's ``?key=``).
No header is logged.

It runs on every request, so it does nothing unless the logger is enabled
for INFO (``--log-level WARNING`` or ``--access-log off`` cost nothing).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from proxy.flow import Flow

INFO = logging.INFO
_new_record = logging.LogRecord.__new__
_START: float = logging._startTime  # type: ignore[attr-defined]  # what LogRecord measures relativeCreated from


def path_without_values(path: str) -> str:
    """``/v1/x?key=abc&q=1`` -> ``/v1/x?key=&q=``. A part with no ``=`` could
    be a bare value: it is dropped."""
    base, sep, query = path.partition("?")
    if not sep:
        return base
    return base + "?" + "&".join(part.partition("=")[0] + "=" for part in query.split("&") if "=" in part)


_WS_FIELDS = ("event", "ended_by", "close_code", "bytes_up", "bytes_down", "frames_up", "frames_down")


def websocket_fields(meta: dict[str, Any]) -> dict[str, Any]:
    """``ws_event=open``, or at close how it ended, bytes and frames each way, and tokens when metered."""
    session = meta["websocket"]
    out: dict[str, Any] = {f"ws_{k}": session[k] for k in _WS_FIELDS if k in session}
    usage = meta.get("usage")
    if usage is not None:
        out["tokens"] = usage.input + usage.output
    return out


class AccessLog:
    name = "access_log"

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger("sidekey.access")
        # The record's constant attributes, made once: LogRecord.__init__ and
        # Logger.info per request cost a quarter of the line (callgrind).
        self._template = logging.LogRecord(self.log.name, INFO, "", 0, "access", None, None).__dict__.copy()

    def response(self, flow: Flow) -> None:
        if self.log.isEnabledFor(INFO):
            self._emit(flow)

    def error(self, flow: Flow) -> None:
        if self.log.isEnabledFor(INFO):
            self._emit(flow)

    def websocket_start(self, flow: Flow) -> None:
        if self.log.isEnabledFor(INFO):
            self._emit(flow)

    def _emit(self, flow: Flow) -> None:
        record = _new_record(logging.LogRecord)
        attrs = record.__dict__
        attrs.update(self._template)
        now = time.time()
        attrs["created"], attrs["msecs"] = now, (now - int(now)) * 1000
        attrs["relativeCreated"] = (now - _START) * 1000
        attrs.update(self.fields(flow))  # after the standard attributes, as extra= puts them
        self.log.handle(record)

    @staticmethod
    def fields(flow: Flow) -> dict[str, Any]:
        """The line's fields, plain values only, in the order they are shown."""
        state, meta, err = flow.upstream_state, flow.metadata, flow.error
        out = {
            "request_id": flow.id,
            "caller": flow.caller,
            "method": flow.request.method,
            "host": flow.request.host,
            "path": path_without_values(flow.request.path),
            # Who served it: after a failover, the fallback provider.
            "provider": state.provider if state is not None else flow.provider_name,
            "upstream": state.name if state is not None else None,
            "status": flow.status,
            "duration_ms": flow.duration_ms,
            "attempts": meta.get("attempts", 1) if meta else 1,
            "error": err.code if err is not None else None,
        }
        if meta and "cache" in meta:  # providers with a cache: hit, miss, stale, coalesced, bypass
            out["cache"] = meta["cache"]
        if meta and "websocket" in meta:  # a WebSocket session's line at open or at close
            out.update(websocket_fields(meta))
        return out

    def __repr__(self) -> str:
        return f"AccessLog({self.log.name}, enabled={self.log.isEnabledFor(INFO)})"
