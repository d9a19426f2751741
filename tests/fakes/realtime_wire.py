"""The fake provider's WebSocket endpoint, shaped like OpenAI's Realtime API
(``GET /v1/realtime?model=...``) closely enough for the ``openai`` SDK's
Realtime client, plus commands a test sends as JSON text messages:

- ``{"type": "response.create", ...}``: ``response.created`` then
  ``response.done`` with ``usage`` (``REALTIME_USAGE``, the model from the URL);
  with ``"response": {"metadata": {"fake": "hold"}}`` only ``response.created``,
  and the ``response.done`` when the test sends ``{"type": "fake.finish"}``;
- ``{"type": "fake.close", "code": N, "reason": "..."}``: the fake closes with that code;
- ``{"type": "fake.die"}``: the fake cuts the TCP connection (no close frame);
- anything else, text or binary: echoed back as it came.

The negotiated extensions are in the 101 (``Sec-WebSocket-Extensions``), as
aiohttp answers a permessage-deflate offer; ``FakeProvider.ws_sessions``
records what each session saw (its close code included).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

REALTIME_USAGE = {
    "total_tokens": 57,
    "input_tokens": 12,
    "output_tokens": 45,
    "input_token_details": {"cached_tokens": 4, "text_tokens": 12, "audio_tokens": 0},
    "output_token_details": {"text_tokens": 45, "audio_tokens": 0},
}


@dataclass
class WSSession:
    path: str
    authorization: str | None
    extensions: str | None  # what the client offered (as the fake received it)
    messages: int = 0
    close_code: int | None = None  # the code the client closed with (None: not closed cleanly)
    events: list[str] = field(default_factory=list)


def response_done(model: str, usage: dict[str, Any]) -> str:
    return json.dumps(
        {
            "type": "response.done",
            "event_id": f"event_{uuid.uuid4().hex[:12]}",
            "response": {
                "object": "realtime.response",
                "id": f"resp_{uuid.uuid4().hex[:12]}",
                "status": "completed",
                "output": [],
                "usage": usage,
                "model": model,
            },
        }
    )


async def realtime(request: web.Request, sessions: list[WSSession], abort: Any) -> web.StreamResponse:
    ws = web.WebSocketResponse(max_msg_size=0, heartbeat=None, autoping=True)
    rec = WSSession(request.path, request.headers.get("Authorization"), request.headers.get("Sec-WebSocket-Extensions"))
    sessions.append(rec)
    await ws.prepare(request)
    model = request.query.get("model", "gpt-realtime")
    held = 0
    async for msg in ws:
        rec.messages += 1
        if msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
            continue
        if msg.type != WSMsgType.TEXT:
            break
        try:
            event = json.loads(msg.data)
        except ValueError:
            event = None
        kind = event.get("type") if isinstance(event, dict) else None
        if isinstance(kind, str):
            rec.events.append(kind)
        if kind == "response.create" and isinstance(event, dict):
            await ws.send_str(json.dumps({"type": "response.created", "response": {"id": "resp_fake"}}))
            hold = (event.get("response") or {}).get("metadata", {}).get("fake") == "hold"
            if hold:
                held += 1
            else:
                await ws.send_str(response_done(model, REALTIME_USAGE))
        elif kind == "fake.finish" and held:
            held -= 1
            await ws.send_str(response_done(model, REALTIME_USAGE))
        elif kind == "fake.close" and isinstance(event, dict):
            await ws.close(code=int(event.get("code", 1000)), message=str(event.get("reason", "")).encode())
            break
        elif kind == "fake.die":
            await abort(request)
            return ws
        else:
            await ws.send_str(msg.data)
    rec.close_code = ws.close_code
    return ws
