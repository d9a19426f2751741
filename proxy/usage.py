"""Token accounting: estimate a request before it goes upstream, then read what
the upstream says it used, from a JSON answer or while an SSE stream passes.
Pure: bytes in, numbers out; no I/O, no asyncio, never raises on bad input.

:class:`Usage` is normalised across providers:

- ``input`` is every prompt token, cached or not. OpenAI's ``prompt_tokens``
  already include ``cached_tokens``; Anthropic's ``input_tokens`` exclude cache
  reads and writes, so those are added back.
- ``cached_input`` and ``cache_creation`` are parts of ``input``; ``reasoning``
  is part of ``output`` (OpenAI counts reasoning in ``completion_tokens``,
  Anthropic counts thinking in ``output_tokens``).

Estimates assume ~4 UTF-8 bytes a token: OpenAI's rule of thumb for English is
4 characters a token, and CJK text (3 bytes a character, about a token each)
lands near the same ratio. They are rough on purpose: a tokenizer per model
would cost more than the answer is worth before the real count arrives.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

Wire = Literal["openai", "anthropic"]

BYTES_PER_TOKEN = 4
IMAGE_TOKENS = 1_000  # crude: OpenAI bills 85..~1,100 by detail and tiles, Anthropic ~w*h/750 up to ~1,600
FILE_TOKENS = 2_000  # crude: a PDF, file or audio part; the real count depends on pages or seconds
MESSAGE_TOKENS = 4  # role and separators per message (OpenAI's cookbook counts 3 or 4)
DEFAULT_MAX_OUTPUT = 4_096  # output cap assumed when the request names none
MAX_OUTPUT = 10_000_000  # a larger requested cap is clamped: no model writes more
MAX_PARSE = 8 << 20  # bodies past this are estimated from their length, not parsed
MAX_LINE = 1 << 20  # SSE: a longer line or event is dropped (its tail searched for usage)
TAIL = 16 << 10  # bytes kept from a dropped line: Responses' usage sits at its end

_CAPS: dict[str, tuple[str, ...]] = {
    # max_completion_tokens replaced max_tokens in OpenAI chat; max_output_tokens is the Responses API's.
    "openai": ("max_completion_tokens", "max_output_tokens", "max_tokens"),
    "anthropic": ("max_tokens",),
}
_PROMPT_KEYS = ("system", "instructions", "messages", "prompt", "input")
_SCHEMA_KEYS = ("tools", "functions", "response_format", "text")  # sent to the model as text, keys and all
_IMAGE_PARTS = frozenset({"image", "image_url", "input_image"})
_FILE_PARTS = frozenset({"document", "file", "input_file", "input_audio", "audio"})
_LABELS = frozenset({"role", "type"})  # in messages these label parts, they are not prompt text
_BOM = b"\xef\xbb\xbf"

_MODEL_RE = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')
_STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
_USAGE_RE = re.compile(rb'"usage"[ \t]*:[ \t]*\{')  # an object: OpenAI sends "usage":null on every chunk


def _text_re(*keys: bytes) -> re.Pattern[bytes]:
    """Streamed output text: string values of ``keys``. Scans for ``":"`` (compact JSON, as every provider
    sends it) and looks behind for the key: far fewer tries than testing each key at every quote."""
    behind = b"|".join(b'(?<="' + k + b'":")' for k in keys)
    return re.compile(rb'":"(?:' + behind + rb')([^"\\\n]*(?:\\.[^"\\\n]*)*)')


# OpenAI: chat deltas, tool-call arguments, reasoning, the Responses API's "delta" strings.
# Anthropic: text_delta, input_json_delta, thinking_delta.
_TEXT_RE: dict[str, re.Pattern[bytes]] = {
    "openai": _text_re(b"content", b"delta", b"arguments", b"refusal", b"reasoning", b"reasoning_content"),
    "anthropic": _text_re(b"text", b"partial_json", b"thinking"),
}


def _tokens(nbytes: int) -> int:
    return -(-nbytes // BYTES_PER_TOKEN)


def _int(value: object) -> int | None:
    """A token count from JSON, or None: not bool, not negative, floats only when whole."""
    if type(value) is int:
        return value if value >= 0 else None
    if type(value) is float and value.is_integer() and 0 <= value < 1e15:
        return int(value)
    return None


def _get(obj: object, *path: str) -> object:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True, slots=True)
class RequestEstimate:
    """What a request may cost before it is sent. ``include_usage`` is OpenAI chat's
    ``stream_options.include_usage``; Anthropic and the Responses API always report usage."""

    prompt_tokens: int
    max_output: int
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    explicit_cap: bool = False  # max_output came from the request, not the default
    parsed: bool = True  # False: the body was not a JSON object; prompt_tokens is from its length

    @property
    def worst_case(self) -> int:
        return self.prompt_tokens + self.max_output


@dataclass(frozen=True, slots=True)
class Usage:
    input: int
    output: int
    cached_input: int = 0
    reasoning: int = 0
    cache_creation: int = 0
    estimated: bool = False
    model: str | None = None

    def __post_init__(self) -> None:
        counts = (self.input, self.output, self.cached_input, self.reasoning, self.cache_creation)
        if any(type(n) is not int or n < 0 for n in counts):
            raise ValueError("token counts must be non-negative integers")

    @property
    def total(self) -> int:
        return self.input + self.output


def _walk(value: object, keys: bool) -> tuple[int, int]:
    """(UTF-8 bytes of text, flat tokens) in a JSON value; images and files at flat rates.
    Iterative: request JSON nests as deep as the client likes."""
    nbytes = flat = 0
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            nbytes += len(v) if v.isascii() else len(v.encode("utf-8", "replace"))
        elif isinstance(v, dict):
            kind = v.get("type")
            if isinstance(kind, str):
                if kind in _IMAGE_PARTS:
                    flat += IMAGE_TOKENS
                    continue
                if kind in _FILE_PARTS:
                    flat += FILE_TOKENS
                    continue
            if "role" in v:
                flat += MESSAGE_TOKENS
            if keys:  # a schema: its keys and type names are text too
                nbytes += sum(map(len, v))
                stack.extend(v.values())
            else:
                stack.extend(x for k, x in v.items() if k not in _LABELS)
        elif isinstance(v, list):
            stack.extend(v)
        elif type(v) is int:
            flat += 1  # a pre-tokenized prompt is a list of token ids
    return nbytes, flat


def estimate_request(
    body: bytes, wire: Wire, *, default_max_output: int = DEFAULT_MAX_OUTPUT, max_parse: int = MAX_PARSE
) -> RequestEstimate:
    """Prompt tokens and the output cap of a chat, completions, Responses or
    Anthropic messages request. One ``json.loads``; anything unparseable is
    estimated from its byte length."""
    by_length = RequestEstimate(_tokens(len(body)), default_max_output, parsed=False)
    if len(body) > max_parse:
        m = _MODEL_RE.search(body)
        model = m.group(1).decode("utf-8", "replace") if m else None
        return RequestEstimate(by_length.prompt_tokens, default_max_output, model, bool(_STREAM_RE.search(body)),
                               parsed=False)  # fmt: skip
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return by_length
    if not isinstance(doc, dict):
        return by_length
    nbytes = flat = 0
    for key in _PROMPT_KEYS + _SCHEMA_KEYS:
        if key in doc:
            b, f = _walk(doc[key], keys=key in _SCHEMA_KEYS)
            nbytes, flat = nbytes + b, flat + f
    cap = next((c for k in _CAPS[wire] if (c := _int(doc.get(k))) is not None and c > 0), None)
    return RequestEstimate(
        prompt_tokens=_tokens(nbytes) + flat,
        max_output=min(cap, MAX_OUTPUT) if cap is not None else default_max_output,
        model=_str(doc.get("model")),
        stream=doc.get("stream") is True,
        include_usage=wire == "openai" and _get(doc, "stream_options", "include_usage") is True,
        explicit_cap=cap is not None,
    )


# (input, output, input details, output details) keys: chat completions and Groq, then the Responses API
_OPENAI_KEYS = (("prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details"),
                ("input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details"))  # fmt: skip
_ANTHROPIC_KEYS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


def _openai_fields(u: dict[str, Any]) -> dict[str, int] | None:
    i, o, i_details, o_details = _OPENAI_KEYS["prompt_tokens" not in u and "completion_tokens" not in u]
    counts = {"input": _int(u.get(i)), "output": _int(u.get(o))}
    if counts["input"] is None and counts["output"] is None:
        return None
    fields = {k: n for k, n in counts.items() if n is not None}
    fields["cached_input"] = _int(_get(u, i_details, "cached_tokens")) or 0
    fields["reasoning"] = _int(_get(u, o_details, "reasoning_tokens")) or 0
    return fields


def _anthropic_raw(u: object) -> dict[str, int]:
    """The counts present (message_delta may send only output_tokens, or nulls)."""
    return {k: n for k in _ANTHROPIC_KEYS if (n := _int(_get(u, k))) is not None}


def _anthropic_fields(raw: dict[str, int]) -> dict[str, int]:
    read, write = raw.get("cache_read_input_tokens", 0), raw.get("cache_creation_input_tokens", 0)
    fields = {"cached_input": read, "cache_creation": write}
    if "input_tokens" in raw:
        fields["input"] = raw["input_tokens"] + read + write
    if "output_tokens" in raw:
        fields["output"] = raw["output_tokens"]
    return fields


def _usage(fields: dict[str, int], *, estimated: bool, model: str | None) -> Usage:
    inp, out = fields.get("input", 0), fields.get("output", 0)
    write = min(fields.get("cache_creation", 0), inp)
    return Usage(inp, out, min(fields.get("cached_input", 0), inp - write), min(fields.get("reasoning", 0), out),
                 write, estimated, model)  # fmt: skip


def usage_from_json(body: bytes, wire: Wire) -> Usage | None:
    """Usage of a non-streamed answer (OpenAI chat or Responses, Groq, Anthropic), or None
    when the body carries none (an error, not JSON)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or not isinstance(u := doc.get("usage"), dict):
        return None
    fields = _openai_fields(u) if wire == "openai" else _anthropic_fields(_anthropic_raw(u))
    if not fields or ("input" not in fields and "output" not in fields):
        return None
    return _usage(fields, estimated=False, model=_str(doc.get("model")))


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
