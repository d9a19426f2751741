"""WebSocket usage (proxy.ws_meter): the Realtime event rules as tables, the
message reader on frames the websockets library serialises (masked,
fragmented, with control frames between), and the same totals for every
split of the byte stream."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Close, Frame, Opcode

from addons.usage.tokens import Usage
from proxy.ws_meter import DEFAULT_RESERVE, MessageReader, RealtimeMeter, realtime_usage

USAGE = {"total_tokens": 57, "input_tokens": 12, "output_tokens": 45, "input_token_details": {"cached_tokens": 4}}


def ev(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def done(usage: object = USAGE, model: str | None = None) -> bytes:
    response: dict[str, object] = {"usage": usage}
    if model:
        response["model"] = model
    return ev(type="response.done", response=response)


@pytest.mark.parametrize(
    ("events", "reserved"),
    [
        ([ev(type="response.create")], [DEFAULT_RESERVE]),
        ([ev(type="response.create", response={"max_output_tokens": 300})], [300]),
        ([ev(type="response.create", response={"max_output_tokens": "inf"})], [DEFAULT_RESERVE]),
        (
            [ev(type="session.update", session={"max_response_output_tokens": 200}), ev(type="response.create")],
            [0, 200],
        ),
        (
            [
                ev(type="session.update", session={"max_output_tokens": 100}),
                ev(type="response.create", response={"max_output_tokens": 50}),
            ],
            [0, 50],
        ),
        ([ev(type="input_audio_buffer.append", audio="AAAA")], [0]),
        ([b"not json", b'{"type": "response.create"'], [0, 0]),
        ([ev(type="conversation.item.create", item={"text": '"response.create"'})], [0]),
    ],
)
def test_client_events_reserve(events: list[bytes], reserved: list[int]) -> None:
    meter = RealtimeMeter()
    assert [meter.client_event(e) for e in events] == reserved


def test_response_done_settles_the_oldest_reservation() -> None:
    meter = RealtimeMeter("gpt-realtime")
    meter.client_event(ev(type="response.create", response={"max_output_tokens": 100}))
    meter.client_event(ev(type="response.create", response={"max_output_tokens": 200}))
    first = meter.server_event(done())
    assert first is not None and first.reserved == 100
    assert first.usage == Usage(12, 45, 4, model="gpt-realtime")
    assert meter.outstanding == 200
    second = meter.server_event(done(model="gpt-realtime-2025"))
    assert second is not None and second.reserved == 200 and second.usage.model == "gpt-realtime-2025"
    server_started = meter.server_event(done())  # voice activity started it: nothing was reserved
    assert server_started is not None and server_started.reserved == 0
    assert meter.total() == Usage(36, 135, 12, model="gpt-realtime")
    assert meter.responses == 3


def test_model_from_the_session_and_a_done_without_usage() -> None:
    meter = RealtimeMeter("from-url")
    assert meter.server_event(ev(type="session.created", session={"model": "gpt-realtime-mini"})) is None
    assert meter.model == "gpt-realtime-mini"
    meter.client_event(ev(type="response.create"))
    cancelled = meter.server_event(ev(type="response.done", response={"status": "cancelled", "usage": None}))
    assert cancelled is not None and cancelled.reserved == DEFAULT_RESERVE and cancelled.usage.total == 0
    assert meter.responses == 0
    assert meter.server_event(ev(type="response.audio.delta", delta="AAAA")) is None


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (USAGE, Usage(12, 45, 4)),
        ({"input_tokens": 5}, Usage(5, 0)),
        ({"input_tokens": 5, "output_tokens": 1, "input_token_details": {"cached_tokens": 9}}, Usage(5, 1, 5)),
        ({"total_tokens": 3}, None),
        ({"input_tokens": -1, "output_tokens": "2"}, None),
        (None, None),
    ],
)
def test_realtime_usage(usage: object, expected: Usage | None) -> None:
    assert realtime_usage(usage, None) == expected


def frames_of(message: bytes, pieces: int, *, masked: bool) -> bytes:
    """``message`` as a text message in ``pieces`` fragments, with a ping between the first two."""
    size = max(1, -(-len(message) // pieces))
    chunks = [message[i : i + size] for i in range(0, len(message), size)] or [b""]
    out = []
    for i, chunk in enumerate(chunks):
        opcode = Opcode.TEXT if i == 0 else Opcode.CONT
        out.append(Frame(opcode, chunk, fin=i == len(chunks) - 1).serialize(mask=masked))
        if i == 0:
            out.append(Frame(Opcode.PING, b"p").serialize(mask=masked))
    return b"".join(out)


@pytest.mark.parametrize("masked", [True, False])
def test_reader_assembles_fragments_and_skips_binary(masked: bool) -> None:
    reader = MessageReader(from_client=masked)
    data = (Frame(Opcode.BINARY, b"\x00" * 10, fin=False).serialize(mask=masked)
            + Frame(Opcode.CONT, b"\x01", fin=True).serialize(mask=masked)
            + frames_of(b'{"type": "response.done"}', 3, masked=masked))  # fmt: skip
    assert reader.feed(data) == [b'{"type": "response.done"}']
    assert not reader.failed


def test_reader_stops_on_a_protocol_error() -> None:
    reader = MessageReader(from_client=True)
    unmasked = Frame(Opcode.TEXT, b"hi").serialize(mask=False)  # RFC 6455 §5.1: a server must refuse it
    assert reader.feed(unmasked) == []
    assert reader.failed
    assert reader.feed(Frame(Opcode.TEXT, b"later").serialize(mask=True)) == []


def test_reader_after_a_close_frame() -> None:
    reader = MessageReader(from_client=False)
    assert reader.feed(Frame(Opcode.CLOSE, Close(1000, "").serialize()).serialize(mask=False)) == []


@given(
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
    pieces=st.integers(1, 5),
    masked=st.booleans(),
)
def test_same_usage_for_every_split(cuts: list[int], pieces: int, masked: bool) -> None:
    stream = b"".join(frames_of(m, pieces, masked=masked)
                      for m in (ev(type="response.audio.delta", delta="A" * 500), done(), done()))  # fmt: skip
    meter, reader = RealtimeMeter("m"), MessageReader(from_client=masked)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for a, b in zip(points, points[1:], strict=False):
        for message in reader.feed(stream[a:b]):
            meter.server_event(message)
    assert meter.total() == Usage(24, 90, 8, model="m")
