"""Reading usage out of an answer as its body passes (the usage addon's ``flow.body_observer``):
a JSON answer kept up to ``MAX_JSON`` for one parse of its ``usage`` object at the end, an event
stream fed to the ``SSEUsageMeter`` (inflated piece by piece when gzip or deflate), and, for
an encoding that cannot be read (br, zstd), a marker that lets the request's estimate stand in.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import Any

from addons.usage.stream import SSEUsageMeter
from addons.usage.tokens import Usage, Wire, usage_from_json, usage_of

MAX_JSON = 4 << 20  # JSON answers up to this are kept to read their usage
INFLATE_PIECE = 64 << 10
MAX_INFLATED = 64 << 20  # a compressed stream is not read past this
_LLM_MARKERS = (b'"model"', b'"messages"')
_USAGE_AT = re.compile(rb'"usage"[ \t\r\n]*:[ \t\r\n]*(?=\{)')
MODEL_AT = re.compile(rb'"model"[ \t\r\n]*:[ \t\r\n]*("[^"\\]{1,256}")')
MAX_USAGE = 8192  # bytes a usage object may span
_DECODER = json.JSONDecoder()
_PLAIN_STRING = re.compile(rb'"[\x20-\x7e]*"\Z')  # printable ASCII, no escapes (MODEL_AT has no backslash)


def wire_of(path: str) -> Wire:
    return "anthropic" if "/v1/messages" in path else "openai"


def looks_llm(body: object) -> bool:
    return type(body) is bytes and (_LLM_MARKERS[0] in body or _LLM_MARKERS[1] in body)


def json_usage(body: bytes, wire: Wire) -> Usage | None:
    """``usage_from_json`` without parsing the whole answer: only the last ``"usage":{...}``
    object (where OpenAI, Anthropic and the Responses API put the top-level one) and the
    first ``"model"`` string. A key inside a JSON string cannot match: its quotes are escaped."""
    end = len(body)
    for _ in range(8):  # "usage" as a value, not a key: look further back
        i = body.rfind(b'"usage"', 0, end)
        if i < 0:
            return None
        found = _USAGE_AT.match(body, i)
        if found is not None:
            break
        end = i
    else:
        return None
    start = found.end()
    try:  # latin-1: one character per byte, so the decoder's end is a byte offset
        usage, length = _DECODER.raw_decode(body[start : start + MAX_USAGE].decode("latin-1"))
    except ValueError:
        return None
    model = MODEL_AT.search(body)
    quoted = model.group(1) if model else None
    if body[start : start + length].isascii() and (quoted is None or _PLAIN_STRING.match(quoted)):
        # The object as parsed is the answer's (ASCII reads the same as latin-1 and UTF-8),
        # and the model string has nothing to unescape: no second parse.
        return usage_of(usage, quoted[1:-1].decode("ascii") if quoted else None, wire)
    # Anything else reads as the full parse would (invalid UTF-8 or a control character
    # in a string makes it None): the two pieces, parsed as one document.
    doc = b'{"usage":' + body[start : start + length] + (b',"model":' + quoted if quoted else b"") + b"}"
    return usage_from_json(doc, wire)


class JSONBody:
    """Keeps a JSON answer (its first MAX_JSON bytes as sent) for one parse at the end."""

    __slots__ = ("parts", "size", "compressed")

    def __init__(self, compressed: bool) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.compressed = compressed

    def __call__(self, piece: bytes) -> None:
        self.size += len(piece)
        if self.size <= MAX_JSON:
            self.parts.append(piece)
        elif self.parts:
            self.parts.clear()

    def body(self) -> bytes | None:
        """The whole body, inflated; None when it was too big or does not inflate."""
        if self.size > MAX_JSON:
            return None
        data = b"".join(self.parts)
        if not self.compressed:
            return data
        inflater = zlib.decompressobj(47)  # gzip or zlib, told apart by the header
        try:
            out = inflater.decompress(data, MAX_JSON)
        except zlib.error:
            return None
        return None if inflater.unconsumed_tail else out


class InflatingSSE:
    """A gzip or deflate event stream: inflated piece by piece into the meter."""

    __slots__ = ("meter", "inflater", "inflated")

    def __init__(self, meter: SSEUsageMeter) -> None:
        self.meter = meter
        self.inflater: Any = zlib.decompressobj(47)
        self.inflated = 0

    def __call__(self, piece: bytes) -> None:
        if self.inflater is None:
            return
        try:
            out = self.inflater.decompress(piece, INFLATE_PIECE)
            while out:
                self.inflated += len(out)
                self.meter.feed(out)
                if self.inflated > MAX_INFLATED:
                    self.inflater = None
                    return
                out = self.inflater.decompress(self.inflater.unconsumed_tail, INFLATE_PIECE)
        except zlib.error:
            self.inflater = None


def unreadable(_piece: bytes) -> None:
    """An encoding we cannot read (br, zstd): the request's estimate stands in."""
