"""Process log set-up: one line per record, as text for a person or JSON for
a log collector.

``text``: ``2026-12-04T16:39:26.123Z INFO sidekey.access: access id=... status=200``,
the message followed by the record's structured fields as ``key=value``
(logfmt, as Heroku's router lines: readable, and greppable by field).
``json``: one object per line with ``time`` (RFC 3339 UTC, milliseconds),
``level``, ``logger``, ``message`` and the structured fields as keys, which is
what Kubernetes log collectors parse. Structured fields are the ``extra=``
of a logging call; they must be plain values (str, int, float, bool, None),
and never a header value or a secret.

``auto`` (the default) is text when stderr is a terminal, JSON otherwise.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

Format = Literal["text", "json"]
FORMATS = ("auto", "text", "json")

# Attributes every LogRecord has (plus what formatters add): anything else came
# from ``extra=`` and is a structured field.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=lambda _v: None)
# A text value that needs no quotes: no space, quote, equals sign or control character.
_BARE = re.compile(r"[^\s\"=\x00-\x1f\x7f]+\Z")


class UtcTime:
    """RFC 3339 UTC with milliseconds (``2026-12-04T16:39:26.123Z``); the
    seconds part is formatted once per second: strftime per line is measurable."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._text = datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._text}.{int((now - second) * 1000):03d}Z"


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's structured fields (its ``extra=``), in the order given."""
    attrs = record.__dict__
    if not attrs.keys() - _STANDARD:  # the common case: a plain message
        return {}
    return {k: v for k, v in attrs.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._time = UtcTime()

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self._time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = fields(record)
        if extra:
            out.update(extra)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return _ENCODER.encode(out)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._time = UtcTime()

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self._time(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        extra = fields(record)
        if extra:
            line += "".join(f" {k}={_text_value(v)}" for k, v in extra.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text_value(value: object) -> str:
    """``-`` for None; quoted (JSON escapes) when a value holds a space, a quote
    or a control character, so a caller-chosen value cannot forge a line."""
    if value is None:
        return "-"
    text = value if isinstance(value, str) else _ENCODER.encode(value)  # never str() of an object
    return text if _BARE.match(text) else json.dumps(text, ensure_ascii=False)


def resolve(fmt: str, stream: TextIO) -> Format:
    """``auto``: text on a terminal, JSON otherwise (a pipe, a file, a container log)."""
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        return "text" if isatty is not None and isatty() else "json"
    if fmt not in ("text", "json"):
        raise ValueError(f"log format: expected one of {', '.join(FORMATS)}")
    return "json" if fmt == "json" else "text"


def configure(level: str | int, fmt: str = "auto", stream: TextIO | None = None) -> Format:
    """Route every log record to ``stream`` (stderr) as text or JSON lines;
    returns the format chosen."""
    stream = stream if stream is not None else sys.stderr
    chosen = resolve(fmt, stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # Nothing we print needs the caller's file and line, thread or process:
    # skipping them is the logging module's documented optimisation, and the
    # access line runs on every request.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    return chosen
