"""Judging a recorded server-sent event stream: did it end, and cleanly?

A stream is stored only when it ended with its wire's terminating event and
carried no error event: a stream cut short or failing mid-way would replay
as a broken answer forever. The bytes are kept exactly as the upstream sent
them, so replaying them gives every field and the original event boundaries
(the blank lines of the WHATWG ``text/event-stream`` format are in the bytes).

Pure code, fed piece by piece in the order sent (any split).
"""

from __future__ import annotations

import json

# The events after which a provider sends nothing more.
TERMINAL_DATA = (b"[DONE]",)  # OpenAI chat and completions
TERMINAL_EVENTS = (b"message_stop", b"response.completed")  # Anthropic messages; OpenAI responses
ERROR_EVENTS = (b"error", b"response.failed", b"response.incomplete")
_MAX_PENDING = 1024 * 1024  # one event larger than this: not judged, not stored


class StreamJudge:
    """Feed it every piece; ``clean`` says whether the stream may be stored."""

    __slots__ = ("pending", "ended", "failed", "events")

    def __init__(self) -> None:
        self.pending = b""
        self.ended = False  # saw the terminating event
        self.failed = False  # saw an error event, or could not follow the stream
        self.events = 0

    def feed(self, piece: bytes) -> None:
        if self.failed:
            return
        data = self.pending + piece if self.pending else piece
        data = data.replace(b"\r\n", b"\n") if b"\r" in data else data
        *complete, self.pending = data.split(b"\n\n")
        for event in complete:
            if event.strip():
                self._event(event)
        if len(self.pending) > _MAX_PENDING:
            self.failed = True

    def _event(self, event: bytes) -> None:
        self.events += 1
        name = b""
        data: list[bytes] = []
        for line in event.split(b"\n"):
            field, _, value = line.partition(b":")
            value = value[1:] if value.startswith(b" ") else value
            if field == b"event":
                name = value.strip()
            elif field == b"data":
                data.append(value)
        payload = b"\n".join(data)
        if self.ended and (name or payload):
            self.failed = True  # anything after the end is not a stream we understand
        if name in ERROR_EVENTS or (b'"error"' in payload and _top_level_error(payload)):
            self.failed = True
        elif payload.strip() in TERMINAL_DATA or name in TERMINAL_EVENTS:
            self.ended = True

    @property
    def clean(self) -> bool:
        return self.ended and not self.failed and not self.pending.strip()


def _top_level_error(payload: bytes) -> bool:
    try:
        value = json.loads(payload)
    except ValueError:
        return False
    return isinstance(value, dict) and value.get("error") is not None and value.get("type") != "content_block_delta"
