"""Usage on a WebSocket session (``websocket_usage: openai-realtime``).

Messages are read with the ``websockets`` library's sans-I/O protocol
(``MessageReader``: RFC 6455 framing, masking, fragmentation, control
frames), beside the relay: the relay has already sent the bytes, the reader
only looks. ``RealtimeMeter`` is the pure part: a ``response.create`` from the
client reserves tokens (its ``max_output_tokens``, else the session's, else
``DEFAULT_RESERVE``), a ``response.done`` from the server carries the
response's ``usage``, which settles the oldest reservation (responses the
server starts itself, with voice activity detection, reserved nothing).

Only messages that name one of those event types are parsed as JSON: audio
deltas, the bulk of a realtime session, are skipped by a substring test.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol, Side, State

from proxy.policy.rates import Usage

if TYPE_CHECKING:
    from proxy.capabilities import SessionTokens, SessionUsage
    from proxy.flow import Flow

log = logging.getLogger("sidekey.websocket")

DEFAULT_RESERVE = 4096  # tokens a response.create reserves when neither it nor the session caps the output
_CLIENT_MARKERS = (b'"response.create"', b'"session.update"')
_SERVER_MARKERS = (b'"response.done"', b'"session.created"', b'"session.updated"')


class MessageReader:
    """Complete text messages of one direction, as the peer receiving them
    would read them. After a protocol error it reads nothing more (the relay
    goes on; only the meter stops)."""

    __slots__ = ("_protocol", "_text", "_binary", "failed")

    def __init__(self, *, from_client: bool) -> None:
        # A server reads what a client sends (masked frames, RFC 6455 §5.1), and vice versa.
        side = Side.SERVER if from_client else Side.CLIENT
        self._protocol = Protocol(side, state=State.OPEN, max_size=None)
        self._text: list[bytes] | None = None  # a fragmented text message, arriving
        self._binary = False  # a fragmented binary message, arriving (its continuations are skipped)
        self.failed = False

    def feed(self, data: bytes) -> list[bytes]:
        if self.failed:
            return []
        protocol = self._protocol
        protocol.receive_data(data)
        protocol.data_to_send()  # the replies it would send (pong, close): the real peers send theirs
        out: list[bytes] = []
        for frame in protocol.events_received():
            if not isinstance(frame, Frame):  # only frames: the handshake is not read here
                continue
            opcode = frame.opcode
            if opcode is Opcode.TEXT:
                self._text, self._binary = [bytes(frame.data)], False
            elif opcode is Opcode.BINARY:
                self._text, self._binary = None, not frame.fin
                continue
            elif opcode is Opcode.CONT and self._text is not None:
                self._text.append(bytes(frame.data))
            else:
                continue
            if frame.fin and self._text is not None:
                out.append(b"".join(self._text))
                self._text = None
        if protocol.parser_exc is not None:
            self.failed = True
        return out


@dataclass(slots=True)
class Settled:
    """One response.done: its usage and the reservation it settles."""

    usage: Usage
    reserved: int


class RealtimeMeter:
    """OpenAI Realtime events to reservations and usage (no I/O)."""

    def __init__(self, model: str | None = None) -> None:
        self.model = model  # the URL's ?model=, until the server names it
        self.session_cap: int | None = None  # the session's max output tokens
        self.pending: deque[int] = deque()  # reservations of responses asked for, oldest first
        self.responses = 0
        self.input = self.output = self.cached_input = 0

    def client_event(self, message: bytes) -> int:
        """Tokens to reserve for this client message (0: none)."""
        if not any(m in message for m in _CLIENT_MARKERS):
            return 0
        event = _object(message)
        kind = event.get("type")
        if kind == "session.update":
            cap = _cap(event.get("session"))
            if cap is not None:
                self.session_cap = cap
            return 0
        if kind != "response.create":
            return 0
        cap = _cap(event.get("response"))
        tokens = cap if cap is not None else self.session_cap if self.session_cap is not None else DEFAULT_RESERVE
        self.pending.append(tokens)
        return tokens

    def server_event(self, message: bytes) -> Settled | None:
        if not any(m in message for m in _SERVER_MARKERS):
            return None
        event = _object(message)
        kind = event.get("type")
        if kind in ("session.created", "session.updated"):
            session = event.get("session")
            model = session.get("model") if isinstance(session, dict) else None
            if isinstance(model, str) and model:
                self.model = model[:256]
            return None
        if kind != "response.done":
            return None
        response = event.get("response")
        if not isinstance(response, dict):
            return None
        model = response.get("model")
        usage = realtime_usage(response.get("usage"), model[:256] if isinstance(model, str) else self.model)
        reserved = self.pending.popleft() if self.pending else 0
        if usage is None:  # a failed or cancelled response without usage: its reservation goes back
            return Settled(Usage(0, 0, model=self.model), reserved)
        self.responses += 1
        self.input += usage.input
        self.output += usage.output
        self.cached_input += usage.cached_input
        return Settled(usage, reserved)

    def total(self) -> Usage:
        return Usage(self.input, self.output, min(self.cached_input, self.input), model=self.model)

    @property
    def outstanding(self) -> int:
        """Tokens still reserved (responses asked for and not done)."""
        return sum(self.pending)


def realtime_usage(u: object, model: str | None) -> Usage | None:
    """``response.usage`` of a Realtime ``response.done``: input and output
    tokens, cached input under ``input_token_details``."""
    if not isinstance(u, dict):
        return None
    inp, out = _count(u.get("input_tokens")), _count(u.get("output_tokens"))
    if inp is None and out is None:
        return None
    details = u.get("input_token_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
    inp, out = inp or 0, out or 0
    return Usage(inp, out, min(cached or 0, inp), model=model)


def _object(message: bytes) -> dict[str, object]:
    try:
        value = json.loads(message)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _count(value: object) -> int | None:
    return value if type(value) is int and value >= 0 else None


def _cap(obj: object) -> int | None:
    """A response's or session's output cap; "inf" (or none) is no cap."""
    if not isinstance(obj, dict):
        return None
    for key in ("max_output_tokens", "max_response_output_tokens"):
        value = _count(obj.get(key))
        if value is not None:
            return value
    return None


class SessionMeter:
    """The relay's observers for one metered session: messages read from each
    direction, reservations and usage handed to the limits and usage addons.
    An exception here stops the metering (logged once), never the relay."""

    def __init__(self, flow: Flow, tokens: SessionTokens | None, usage: SessionUsage | None, model: str | None) -> None:
        self.flow = flow
        self.tokens = tokens
        self.usage = usage
        self.meter = RealtimeMeter(model)
        self.up = MessageReader(from_client=True)
        self.down = MessageReader(from_client=False)
        self.cost: float | None = 0.0  # None once a response was unpriced
        self.stopped = False

    def observe_up(self, data: bytes) -> None:
        if self.stopped:
            return
        try:
            for message in self.up.feed(data):
                tokens = self.meter.client_event(message)
                if tokens and self.tokens is not None:
                    self.tokens.reserve_tokens(self.flow, tokens)
        except Exception as exc:  # noqa: BLE001 - the bytes are already relayed; only metering stops
            self._stop(exc)

    def observe_down(self, data: bytes) -> None:
        if self.stopped:
            return
        try:
            for message in self.down.feed(data):
                settled = self.meter.server_event(message)
                if settled is None:
                    continue
                if self.tokens is not None:
                    self.tokens.settle_tokens(self.flow, settled.reserved, settled.usage.total)
                if self.usage is not None and (settled.usage.input or settled.usage.output):
                    cost = self.usage.record_usage(self.flow, settled.usage)
                    self.cost = None if cost is None or self.cost is None else self.cost + cost
        except Exception as exc:  # noqa: BLE001 - as above
            self._stop(exc)

    def finish(self) -> None:
        """The session ended: unsettled reservations go back; the totals go on the flow for audit and access lines."""
        outstanding = self.meter.outstanding
        self.meter.pending.clear()
        if outstanding and self.tokens is not None:
            self.tokens.settle_tokens(self.flow, outstanding, 0)
        meta = self.flow.metadata
        meta["usage"] = self.meter.total()
        meta["cost"] = self.cost
        if self.up.failed or self.down.failed:
            log.warning("flow %s: WebSocket frames could not be read for usage (protocol error); "
                        "usage after it is not counted", self.flow.id)  # fmt: skip

    def _stop(self, exc: Exception) -> None:
        self.stopped = True
        log.error("flow %s: WebSocket usage metering stopped: %s", self.flow.id, type(exc).__name__)
