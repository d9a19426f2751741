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

from proxy.policy.rates import Usage

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

# max_tokens (both wires), max_completion_tokens (OpenAI chat), max_output_tokens (Responses)
_OUTPUT_CAP_RE = re.compile(rb'"max(?:_completion|_output)?_tokens"\s*:\s*(\d{1,9})')
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


def reservation(body: object, length: int | None) -> int:
    """Tokens a token limit reserves for a request before it is sent: the prompt at ~4 bytes a
    token (the body's length: JSON's punctuation makes it an over-estimate, corrected when the
    answer's usage is known) plus the output cap the request names. A regex, not a JSON parse:
    this runs on every request of a provider with token limits."""
    if not body:
        return 0  # a GET, a HEAD, a DELETE (None or b""): no prompt, nothing to generate
    if not isinstance(body, bytes):  # streamed: only its length is known
        return (length or 0) // BYTES_PER_TOKEN + DEFAULT_MAX_OUTPUT
    cap = _OUTPUT_CAP_RE.search(body)
    return len(body) // BYTES_PER_TOKEN + (int(cap[1]) if cap else DEFAULT_MAX_OUTPUT)


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
    inp, out = _int(u.get(i)), _int(u.get(o))
    if inp is None and out is None:
        return None
    fields: dict[str, int] = {}
    if inp is not None:
        fields["input"] = inp
    if out is not None:
        fields["output"] = out
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
    if not isinstance(doc, dict):
        return None
    return usage_of(doc.get("usage"), doc.get("model"), wire)


def usage_of(u: object, model: object, wire: Wire) -> Usage | None:
    """Usage from an answer's parsed ``usage`` object and its ``model`` value, as
    ``usage_from_json`` reads them; None when the object carries no counts."""
    if not isinstance(u, dict):
        return None
    fields = _openai_fields(u) if wire == "openai" else _anthropic_fields(_anthropic_raw(u))
    if not fields or ("input" not in fields and "output" not in fields):
        return None
    return _usage(fields, estimated=False, model=_str(model))


__all__ = ["RequestEstimate", "Usage", "Wire", "estimate_request", "reservation", "usage_from_json", "usage_of"]
