"""OpenAI wire format for the fake provider: JSON bodies and SSE chunks.

Shapes follow the real ``/v1/chat/completions`` and ``/v1/models`` answers
closely enough that the official ``openai`` SDK parses them.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

OPENAI_REPLY = "Hello from fake openai"
FINGERPRINT = "fp_fake0001"


def split_words(text: str) -> list[str]:
    """Split ``text`` into word pieces that keep their leading space."""
    words = text.split(" ")
    return [words[0]] + [" " + w for w in words[1:]] if words else []


def prompt_tokens(body: Any) -> int:
    """A deterministic 'token count' for a request body (words in messages)."""
    count = 0
    messages = body.get("messages") if isinstance(body, dict) else None
    for msg in messages if isinstance(messages, list) else []:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):
            count += len(content.split())
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    count += len(part["text"].split())
    return max(count, 1)


def error_body(message: str, *, type_: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def auth_error(presented: str | None) -> dict[str, Any]:
    shown = (presented[:3] + "***") if presented else "<none>"
    return error_body(
        f"Incorrect API key provided: {shown}. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        type_="invalid_request_error",
        code="invalid_api_key",
    )


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def chat_completion(body: Any, text: str = OPENAI_REPLY) -> dict[str, Any]:
    """A complete non-streaming ``chat.completion`` object."""
    model = body.get("model", "gpt-fake") if isinstance(body, dict) else "gpt-fake"
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex[:24],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(prompt_tokens(body), len(split_words(text))),
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT,
    }


def chat_stream_events(body: Any, text: str = OPENAI_REPLY) -> list[bytes]:
    """Every SSE event (already framed as ``data: ...\\n\\n``) of a streamed answer.

    Sequence: role delta, one content delta per word, finish_reason chunk,
    optional usage chunk (``stream_options.include_usage``), ``[DONE]``.
    """
    body = body if isinstance(body, dict) else {}
    opts = body.get("stream_options")
    include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
    pieces = split_words(text)
    base: dict[str, Any] = {
        "id": "chatcmpl-" + uuid.uuid4().hex[:24],
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.get("model", "gpt-fake"),
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT,
    }

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        c = dict(base)
        c["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        if include_usage:
            c["usage"] = None
        return c

    chunks = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
    chunks += [chunk({"content": p}, None) for p in pieces]
    chunks.append(chunk({}, "stop"))
    if include_usage:
        final = dict(base)
        final["choices"] = []
        final["usage"] = _usage(prompt_tokens(body), len(pieces))
        chunks.append(final)
    events = [sse_data(c) for c in chunks]
    events.append(b"data: [DONE]\n\n")
    return events


def sse_data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def models_list() -> dict[str, Any]:
    created = 1_700_000_000
    ids = ["gpt-4o-mini", "gpt-4o", "gpt-fake"]
    return {
        "object": "list",
        "data": [{"id": i, "object": "model", "created": created, "owned_by": "fake"} for i in ids],
    }
