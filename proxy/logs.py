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
import math
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from itertools import islice
from typing import Any, Literal, TextIO

Format = Literal["text", "json"]
FORMATS = ("auto", "text", "json")

# The attributes LogRecord.__init__ sets, in order; the ``extra=`` of a call
# (the structured fields) come right after them. Formatters may add these later.
_INIT_KEYS = tuple(logging.LogRecord("", 0, "", 0, "", None, None).__dict__)
_ADDED = ("message", "asctime", "taskName")
_STANDARD = frozenset(_INIT_KEYS) | frozenset(_ADDED)
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=lambda _v: None)
_q: Callable[[str], str] = json.encoder.encode_basestring  # JSON's own string escaper (C)
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
        return self._text + _MILLIS[int((now - second) * 1000)]


_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))  # a lookup is cheaper than formatting


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's structured fields (its ``extra=``), in the order given.
    Sliced after the standard attributes (C-level: a scan per key cost more
    than the rest of an access line); any other record is scanned."""
    attrs = record.__dict__
    count = len(_INIT_KEYS)
    # The last standard attribute at its place: exactly the standard ones precede it.
    if len(attrs) >= count and next(islice(attrs, count - 1, None)) == _INIT_KEYS[-1]:
        if len(attrs) == count:
            return {}  # the common case: a plain message
        extra = dict(islice(attrs.items(), count, None))
        for key in _ADDED:
            extra.pop(key, None)
        return extra
    return {k: v for k, v in attrs.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._time = UtcTime()

    def format(self, record: logging.LogRecord) -> str:
        # Joined by hand: json.dumps of a dict cost more than the whole access
        # line otherwise does (a test keeps this equal to json.loads' view).
        parts = ['{"time":"', self._time(record.created), '","level":"', record.levelname,
                 '","logger":', _q(record.name), ',"message":', _q(record.getMessage())]  # fmt: skip
        for key, value in fields(record).items():
            parts += (_KEYS.get(key) or _key(key), _q(value) if type(value) is str else _json_value(value))
        if record.exc_info:
            parts += (',"exception":', _q(self.formatException(record.exc_info)))
        parts.append("}")
        return "".join(parts)


_KEYS: dict[str, str] = {}  # field name -> ',"name":' (few names: made once each)


def _key(name: str) -> str:
    text = "," + _q(name) + ":"
    if len(_KEYS) < 1024:
        _KEYS[name] = text
    return text


def _json_value(value: object) -> str:
    kind = type(value)
    if kind is str:
        return _q(value)  # type: ignore[arg-type]
    if value is None:
        return "null"
    if kind is int:
        return int.__repr__(value)
    if kind is float:
        return float.__repr__(value) if math.isfinite(value) else "null"  # type: ignore[arg-type]
    return _ENCODER.encode(value)  # bool, lists, dicts; anything else is null, never str()


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
