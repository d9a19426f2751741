"""WebSocket decisions without I/O (proxy.ws_frames, proxy.ws_relay.expiry,
proxy.policy.websocket): tables, and hypothesis properties for the frame
tracker (the same answer for every way the bytes are split)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict
from websockets.frames import Close, Frame, Opcode

from proxy import ws_frames
from proxy.policy.load import PolicyError, parse_policy
from proxy.policy.websocket import offers_websocket
from proxy.ws_frames import BadResponse, FrameTracker, close_label, parse_response_head, strip_deflate, upgrade_accepted
from proxy.ws_relay import expiry


def h(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


@pytest.mark.parametrize(
    ("method", "version", "headers", "expected"),
    [
        ("GET", "HTTP/1.1", h(("Upgrade", "websocket"), ("Connection", "Upgrade")), True),
        ("GET", "HTTP/1.1", h(("upgrade", "WebSocket"), ("connection", "keep-alive, Upgrade")), True),
        ("GET", "HTTP/1.1", h(("Upgrade", "foo, websocket"), ("Connection", "upgrade")), True),
        ("GET", "HTTP/1.1", h(("Upgrade", "websocket")), False),  # no Connection: upgrade
        ("GET", "HTTP/1.1", h(("Upgrade", "h2c"), ("Connection", "Upgrade")), False),
        ("POST", "HTTP/1.1", h(("Upgrade", "websocket"), ("Connection", "Upgrade")), False),
        ("GET", "HTTP/1.0", h(("Upgrade", "websocket"), ("Connection", "Upgrade")), False),
    ],
)
def test_is_websocket_upgrade(method: str, version: str, headers: CIMultiDict[str], expected: bool) -> None:
    assert ws_frames.is_websocket_upgrade(method, version, headers) is expected


@pytest.mark.parametrize(
    ("offers", "kept"),
    [
        ("permessage-deflate; client_max_window_bits", None),
        ("permessage-deflate, permessage-deflate; server_no_context_takeover", None),
        ("x-custom, permessage-deflate; client_max_window_bits", "x-custom"),
        ("x-a; p=1, x-b", "x-a; p=1, x-b"),
        ("PerMessage-Deflate", None),
        ("", None),
    ],
)
def test_strip_deflate(offers: str, kept: str | None) -> None:
    assert strip_deflate(offers) == kept


def test_parse_response_head() -> None:
    data = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-A:  b \r\n\r\n"
    head = parse_response_head(data)
    assert (head.status, head.reason) == (101, b"Switching Protocols")
    assert head.headers["x-a"] == "b"
    assert parse_response_head(b"HTTP/1.1 401\r\n\r\n").status == 401


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/2 101 x\r\n\r\n",
        b"HTTP/1.1 1010 x\r\n\r\n",
        b"HTTP/1.1 101 x\r\nno colon\r\n\r\n",
        b"HTTP/1.1 101 x\r\nbad name: v\r\n\r\n",
        b"HTTP/1.1 101 x\r\nA: v\x00\r\n\r\n",
        b"HTTP/1.1 101 x\r\n folded\r\n\r\n",
        b"HTTP/1.1 101 x\rY\r\n\r\n",
    ],
)
def test_parse_response_head_refuses(data: bytes) -> None:
    with pytest.raises(BadResponse):
        parse_response_head(data)


@pytest.mark.parametrize(
    ("head", "metering", "problem"),
    [
        (b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", False, None),
        (
            b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
            False,
            None,
        ),
        (
            b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
            True,
            "permessage-deflate though it was not offered",
        ),
        (b"HTTP/1.1 101 OK\r\nConnection: Upgrade\r\n\r\n", False, "no Upgrade: websocket"),
        (b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\n\r\n", False, "no Connection: upgrade"),
        (b"HTTP/1.1 200 OK\r\n\r\n", False, "not 101"),
    ],
)
def test_upgrade_accepted(head: bytes, metering: bool, problem: str | None) -> None:
    assert upgrade_accepted(parse_response_head(head), metering=metering) == problem


@pytest.mark.parametrize(
    ("code", "label"),
    [
        (None, "none"),
        (1000, "1000"),
        (1006, "1006"),
        (1015, "1015"),
        (1016, "other"),
        (2999, "other"),
        (3000, "3xxx"),
        (4001, "4xxx"),
        (4999, "4xxx"),
        (5000, "other"),
    ],
)
def test_close_label_is_bounded(code: int | None, label: str) -> None:
    assert close_label(code) == label


@pytest.mark.parametrize(
    ("now", "last", "idle", "longest", "expected"),
    [
        (10.0, 9.0, 5.0, 100.0, (4.0, None)),  # idle in 4 s
        (10.0, 9.0, 50.0, 20.0, (10.0, None)),  # the duration ends first
        (10.0, 4.0, 5.0, 100.0, (0.0, "idle")),
        (20.0, 19.0, 5.0, 20.0, (0.0, "max_duration")),  # both: the duration names it
        (30.0, 20.0, 5.0, 20.0, (0.0, "max_duration")),
    ],
)
def test_expiry(now: float, last: float, idle: float, longest: float, expected: tuple[float, str | None]) -> None:
    assert expiry(now, 0.0, last, idle, longest) == expected


def frame(opcode: Opcode, payload: bytes, *, masked: bool, fin: bool = True) -> bytes:
    return Frame(opcode, payload, fin=fin).serialize(mask=masked)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
@pytest.mark.parametrize("masked", [False, True])
def test_tracker_counts_frames_of_every_length_form(size: int, masked: bool) -> None:
    data = frame(Opcode.BINARY, b"x" * size, masked=masked)
    t = FrameTracker()
    t.feed(data[:-1])
    assert (t.frames, t.at_boundary) == ((0, False) if data[:-1] else (0, True))
    t.feed(data[-1:])
    assert (t.frames, t.at_boundary, t.bytes, t.close_code) == (1, True, len(data), None)


@pytest.mark.parametrize("masked", [False, True])
def test_tracker_reads_the_close_code(masked: bool) -> None:
    t = FrameTracker()
    t.feed(
        frame(Opcode.TEXT, b"hi", masked=masked) + frame(Opcode.CLOSE, Close(4001, "bye").serialize(), masked=masked)
    )
    assert (t.frames, t.close_code, t.close_seen) == (2, 4001, True)
    empty = FrameTracker()
    empty.feed(frame(Opcode.CLOSE, b"", masked=masked))
    assert empty.close_code == 1005  # RFC 6455 §7.1.5: no status code given


def test_close_frame_round_trips() -> None:
    for masked in (False, True):
        t = FrameTracker()
        t.feed(ws_frames.close_frame(1001, "idle timeout", masked=masked))
        assert t.close_code == 1001 and t.at_boundary


_frames = st.lists(
    st.tuples(
        st.sampled_from([Opcode.TEXT, Opcode.BINARY, Opcode.PING, Opcode.CONT]), st.binary(max_size=300), st.booleans()
    ),
    max_size=8,
)


@given(
    frames=_frames,
    masked=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
    code=st.sampled_from([1000, 1001, 1002, 1008, 1011, 3000, 4001, 4999]),
)
def test_tracker_same_answer_for_every_split(
    frames: list[tuple[Opcode, bytes, bool]], masked: bool, cuts: list[int], code: int
) -> None:
    parts = [
        frame(op, p[:125] if op == Opcode.PING else p, masked=masked, fin=fin or op == Opcode.PING)
        for op, p, fin in frames
    ]
    parts.append(frame(Opcode.CLOSE, Close(code, "r").serialize(), masked=masked))
    data = b"".join(parts)
    ends = set()
    pos = 0
    for part in parts:
        pos += len(part)
        ends.add(pos)
    whole = FrameTracker()
    whole.feed(data)
    split = FrameTracker()
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in zip(points, points[1:], strict=False):
        split.feed(data[a:b])
        assert split.at_boundary == (b in ends or b == 0)
    for t in (whole, split):
        assert (t.frames, t.bytes, t.close_code, t.at_boundary) == (len(parts), len(data), code, True)


@pytest.mark.parametrize(
    ("hosts", "expected"),
    [
        (("api.openai.com",), True),
        (("myres.openai.azure.com",), True),
        (("*.openai.azure.com",), True),
        (("api.anthropic.com",), False),
        (("generativelanguage.googleapis.com",), True),
        (("example.test",), False),
    ],
)
def test_known_websocket_hosts(hosts: tuple[str, ...], expected: bool) -> None:
    assert offers_websocket(hosts) is expected


POLICY = """\
version: 1
providers:
  openai:
    hosts: [api.openai.com]
    auth: {type: none}
  other:
    hosts: [api.other.test]
    auth: {type: none}
    websocket: true
    websocket_idle_timeout: 30s
    websocket_max_duration: 2m
    websocket_usage: openai-realtime
    limits: {concurrent_websockets: 3, requests_per_minute: 10}
    caller_limits: {concurrent_websockets: 1}
  closed:
    hosts: [api.openai.com.example]
    auth: {type: none}
"""


def test_policy_fields_and_defaults() -> None:
    policy = parse_policy(POLICY, "p.yaml", Path("/"))
    openai, other, closed = (policy.provider(n) for n in ("openai", "other", "closed"))
    assert openai is not None and other is not None and closed is not None
    assert openai.websocket.allowed and openai.websocket.usage == "none"
    assert (openai.websocket.idle_timeout, openai.websocket.max_duration) == (300.0, 3600.0)
    assert not closed.websocket.allowed
    ws = other.websocket
    assert (ws.allowed, ws.idle_timeout, ws.max_duration, ws.usage) == (True, 30.0, 120.0, "openai-realtime")
    assert (ws.max_sessions, ws.caller_max_sessions) == (3, 1)
    assert [r.kind for r in other.limits] == ["requests"]  # the session count is not a rate rule


@pytest.mark.parametrize(
    ("line", "field", "words"),
    [
        ("websocket: maybe", "providers.p.websocket", "expected one of: true, false"),
        ("websocket_usage: anthropic", "providers.p.websocket_usage", "openai-realtime"),
        ("websocket_idle_timeout: -1", "providers.p.websocket_idle_timeout", "expected a duration"),
        ("limits: {concurrent_websockets: 0}", "providers.p.limits.concurrent_websockets", "expected a whole number"),
    ],
)
def test_policy_problems_name_line_and_field(line: str, field: str, words: str) -> None:
    text = f"version: 1\nproviders:\n  p:\n    hosts: [a.test]\n    auth: {{type: none}}\n    {line}\n"
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml", Path("/"))
    assert any(p.line == 6 and p.field == field and words in p.message for p in info.value.problems), info.value
