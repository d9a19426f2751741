"""Reading usage out of a streamed (SSE) answer as it passes. Pure: bytes in,
numbers out; split from ``addons.usage.tokens`` (the request estimate and JSON usage).
"""

from __future__ import annotations

import json

from addons.usage.tokens import (
    _BOM,
    _MODEL_RE,
    _TEXT_RE,
    _USAGE_RE,
    MAX_LINE,
    TAIL,
    RequestEstimate,
    Usage,
    Wire,
    _anthropic_fields,
    _anthropic_raw,
    _get,
    _openai_fields,
    _str,
    _tokens,
    _usage,
)


class SSEUsageMeter:
    """Reads usage out of a streamed answer as its chunks pass, split anywhere.

    Follows the SSE rules (WHATWG HTML §9.2.6: lines end in CRLF, LF or CR;
    ``data:`` lines of an event join with LF; a blank line dispatches it; a
    leading BOM is dropped). Cheap per chunk: the complete lines of a chunk are
    scanned as one block with C-level searches (the output text, the model name
    while unknown, a ``"usage":{`` object); only blocks with a usage object or a
    needed model name are split into events, and only events holding a usage
    object are JSON-parsed (one to three a stream). Memory is bounded: a line or
    an event longer than ``max_line`` is dropped, keeping its last ``TAIL``
    bytes to find a usage object at its end.
    """

    __slots__ = ("wire", "max_line", "_text_re", "_buf", "_started", "_skip_lf", "_discarding", "_tail", "_data",
                 "_data_len", "_model", "_fields", "_final", "_text_bytes", "_bytes", "_parsed",
                 "_dropped", "_bad_json")  # fmt: skip

    def __init__(self, wire: Wire, *, max_line: int = MAX_LINE) -> None:
        self.wire = wire
        self.max_line = max_line
        self._text_re = _TEXT_RE[wire]
        self._buf = bytearray()  # the unfinished line
        self._started = False  # past the first line (where a BOM may sit)
        self._skip_lf = False  # the last chunk ended in CR: an LF opening the next one ends nothing
        self._discarding = False  # inside an over-long line; only its tail is kept
        self._tail = b""
        self._data: list[bytes] = []  # data lines of the open event
        self._data_len = 0  # bytes in them; -1: the open event overflowed and is being dropped
        self._model: str | None = None
        self._fields: dict[str, int] = {}  # OpenAI: the last usage report; Anthropic: raw counts merged
        self._final = False  # the output count is the upstream's final one
        self._text_bytes = self._bytes = self._parsed = self._dropped = self._bad_json = 0

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self._bytes += len(chunk)
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
        if b"\r" in chunk:
            self._skip_lf = chunk[-1] == 0x0D
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if self._discarding:
            nl = chunk.find(b"\n")
            if nl < 0:
                self._append(chunk)
                return
            self._oversized(self._tail + chunk[max(0, nl - TAIL) : nl])
            chunk = chunk[nl + 1 :]
        end = chunk.rfind(b"\n") + 1
        if not end:
            self._append(chunk)
            return
        if self._buf:
            self._buf += chunk[:end]
            block = bytes(self._buf)
            self._buf.clear()
        else:
            block = chunk[:end] if end < len(chunk) else chunk
        self._block(block)
        if end < len(chunk):
            self._append(chunk[end:])

    def finish(self, prompt_estimate: RequestEstimate | None = None) -> Usage:
        """Totals so far. A stream cut before its last newline or blank line still
        counts what it carried. Counts the upstream did not report come from
        ``prompt_estimate`` (input) and the streamed text (output), and mark the
        result estimated."""
        if self._discarding:
            self._oversized(self._tail)
        elif self._buf:
            self._buf += b"\n"
            block = bytes(self._buf)
            self._buf.clear()
            self._block(block)
        self._dispatch()
        fields = dict(self._fields if self.wire == "openai" else _anthropic_fields(self._fields))
        have_input, have_output = "input" in fields, self._final and "output" in fields
        if not have_input:
            fields["input"] = prompt_estimate.prompt_tokens if prompt_estimate else 0
        if not have_output:
            fields["output"] = max(fields.get("output", 0), _tokens(self._text_bytes))
        model = self._model or (prompt_estimate.model if prompt_estimate else None)
        return _usage(fields, estimated=not (have_input and have_output), model=model)

    @property
    def reported(self) -> bool:
        """The upstream sent its final usage: finish() will not estimate the output."""
        return self._final

    def statistics(self) -> dict[str, int]:
        return {"bytes": self._bytes, "parsed": self._parsed, "dropped": self._dropped,
                "bad_json": self._bad_json, "text_bytes": self._text_bytes,
                "buffered": len(self._buf) + len(self._tail) + max(self._data_len, 0)}  # fmt: skip

    def __repr__(self) -> str:
        return (f"SSEUsageMeter({self.wire}, model={self._model!r}, parsed={self._parsed}, "
                f"dropped={self._dropped}, reported={self._final})")  # fmt: skip

    def _append(self, piece: bytes) -> None:
        if self._discarding:
            self._tail = (self._tail + piece[-TAIL:])[-TAIL:]
            return
        self._buf += piece
        if len(self._buf) > self.max_line:
            self._discarding, self._tail, self._buf = True, bytes(self._buf[-TAIL:]), bytearray()

    def _block(self, block: bytes) -> None:
        """Complete lines, each ending in LF."""
        if not self._started:
            self._started = True
            if block.startswith(_BOM):
                block = block[3:]
        start = 0
        if self._data or self._data_len:  # an event is open: read up to its blank line line by line
            i = block.find(b"\n\n")
            start = 1 if block[:1] == b"\n" else i + 2 if i >= 0 else len(block)
            for line in block[:start].split(b"\n")[:-1]:
                self._line(line)
        # [start, end): whole events; the lines after them open the next one and are read one by one.
        i = block.rfind(b"\n\n", start)
        end = i + 2 if i >= 0 else start + 1 if block[start : start + 1] == b"\n" else start
        if end > start:
            if end - start > self.max_line or (self._model is None and block.find(b'"model"', start, end) >= 0):
                end = start  # lines may be too long, or the model is needed: read them one by one
            elif _USAGE_RE.search(block, start, end):
                end = start  # a usage object: parse its event
            else:
                self._text_bytes += sum(map(len, self._text_re.findall(block, start, end)))
        if end < len(block):
            for line in block[end:].split(b"\n")[:-1]:
                self._line(line)

    def _oversized(self, tail: bytes) -> None:
        """An over-long line ended. A Responses ``response.completed`` event repeats the
        whole output before its usage, so look for a usage object in the tail."""
        self._started, self._discarding, self._tail = True, False, b""
        self._dropped += 1
        self._data_len = -1  # the event it belonged to is incomplete: drop it
        self._data.clear()
        if self.wire != "openai" or not (starts := list(_USAGE_RE.finditer(tail[-TAIL:]))):
            return
        try:
            u, _ = json.JSONDecoder().raw_decode(tail[-TAIL:][starts[-1].end() - 1 :].decode("utf-8", "replace"))
        except (ValueError, RecursionError):
            self._bad_json += 1
            return
        if isinstance(u, dict) and (fields := _openai_fields(u)) is not None:
            self._fields, self._final = fields, True

    def _line(self, line: bytes) -> None:
        if len(line) > self.max_line:
            self._oversized(line[-TAIL:])
            return
        self._text_bytes += sum(map(len, self._text_re.findall(line)))
        if not line:
            self._dispatch()
            return
        if line.startswith(b"data:"):
            value = line[6:] if line[5:6] == b" " else line[5:]
        elif line == b"data":
            value = b""
        else:
            return  # comments (":"), event:, id:, retry: carry no usage
        if self._data_len < 0:
            return
        self._data_len += len(value) + 1
        if self._data_len > self.max_line:
            self._dropped += 1
            self._data_len = -1
            self._data.clear()
            return
        self._data.append(value)

    def _dispatch(self) -> None:
        if self._data:
            self._event(self._data[0] if len(self._data) == 1 else b"\n".join(self._data))
            self._data.clear()
        self._data_len = 0

    def _event(self, data: bytes) -> None:
        if self._model is None and (m := _MODEL_RE.search(data)):
            self._model = m.group(1).decode("utf-8", "replace")
        if _USAGE_RE.search(data):
            self._parse(data)

    def _parse(self, data: bytes) -> None:
        self._parsed += 1
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            self._bad_json += 1
            return
        if not isinstance(obj, dict):
            return
        if self.wire == "openai":
            # chat's include_usage chunk, Groq's x_groq.usage, the Responses API's response.completed
            for u in (obj.get("usage"), _get(obj, "x_groq", "usage"), _get(obj, "response", "usage")):
                if isinstance(u, dict) and (fields := _openai_fields(u)) is not None:
                    self._fields, self._final = fields, True
            model = _str(obj.get("model")) or _str(_get(obj, "response", "model"))
        elif obj.get("type") == "message_start":  # input and cache counts; output_tokens is a placeholder
            self._fields.update(_anthropic_raw(_get(obj, "message", "usage")))
            model = _str(_get(obj, "message", "model"))
        else:  # message_delta: cumulative counts, output_tokens final
            raw = _anthropic_raw(obj.get("usage"))
            self._fields.update(raw)
            self._final = self._final or (obj.get("type") == "message_delta" and "output_tokens" in raw)
            model = None
        if model:
            self._model = model
