"""Anthropic wire format for the fake provider: ``/v1/messages`` JSON and SSE.

The streaming sequence is the one the real API sends (``event: <type>`` +
``data: <json>``): message_start, content_block_start, ping,
content_block_delta*, content_block_stop, message_delta, message_stop.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from .openai_wire import split_words

ANTHROPIC_REPLY = "Hello from fake anthropic"


def input_tokens(body: Any) -> int:
    """A deterministic 'token count' for a request (words in system + messages)."""
    count = 0
    if not isinstance(body, dict):
        return 1
    texts: list[Any] = [body.get("system")]
    for msg in body.get("messages") or []:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list):
            texts += [p.get("text") for p in content if isinstance(p, dict)]
        else:
            texts.append(content)
    for t in texts:
        if isinstance(t, str):
            count += len(t.split())
    return max(count, 1)


def auth_error() -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid x-api-key"},
    }


def _usage(inp: int, out: int) -> dict[str, Any]:
    return {
        "input_tokens": inp,
        "output_tokens": out,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "service_tier": "standard",
    }


def _model(body: Any) -> Any:
    return body.get("model", "claude-fake") if isinstance(body, dict) else "claude-fake"


def message(body: Any, text: str = ANTHROPIC_REPLY) -> dict[str, Any]:
    """A complete non-streaming ``message`` object."""
    return {
        "id": "msg_" + uuid.uuid4().hex[:24],
        "type": "message",
        "role": "assistant",
        "model": _model(body),
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": _usage(input_tokens(body), len(split_words(text))),
    }


def sse_event(kind: str, data: dict[str, Any]) -> bytes:
    payload = json.dumps(data, separators=(",", ":"))
    return f"event: {kind}\ndata: {payload}\n\n".encode()


def message_stream_events(body: Any, text: str = ANTHROPIC_REPLY) -> list[bytes]:
    """Every SSE event of a streamed ``/v1/messages`` answer, framed."""
    pieces = split_words(text)
    start = {
        "id": "msg_" + uuid.uuid4().hex[:24],
        "type": "message",
        "role": "assistant",
        "model": _model(body),
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": _usage(input_tokens(body), 1),
    }
    events = [
        sse_event("message_start", {"type": "message_start", "message": start}),
        sse_event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        sse_event("ping", {"type": "ping"}),
    ]
    for p in pieces:
        delta = {"type": "text_delta", "text": p}
        events.append(
            sse_event(
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": delta},
            )
        )
    events += [
        sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse_event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": len(pieces)},
            },
        ),
        sse_event("message_stop", {"type": "message_stop"}),
    ]
    return events
