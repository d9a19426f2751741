"""WebSocket decisions without I/O: is a request an upgrade (RFC 6455 §4),
how the upstream's handshake answer reads, where frames begin and end in a
byte stream sidekey relays without terminating it (§5.2), and the close
frames sidekey itself sends (§5.5.1).

``FrameTracker`` reads frame *headers* only: it never holds a payload (only a
close frame's, at most 125 bytes by §5.5) and never inspects the RSV bits,
so an extension negotiated end to end (permessage-deflate) passes untouched.
It lets the relay send its own close frame only between two frames, and
count frames and close codes. Reading message content is the meter's job,
through the ``websockets`` library (``proxy.ws_meter``).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from multidict import CIMultiDict
from websockets.frames import Close, Frame, Opcode

from proxy.http1 import Headers, connection_tokens

# RFC 6455 §7.4.1
NORMAL, GOING_AWAY, PROTOCOL_ERROR, NO_STATUS, ABNORMAL, INTERNAL_ERROR = 1000, 1001, 1002, 1005, 1006, 1011
_OP_CLOSE = 0x8
_MAX_CONTROL = 125  # §5.5: control frames carry at most 125 payload bytes
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: ([\x09\x20-\x7e\x80-\xff]*))?\Z")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


def is_websocket_upgrade(method: str, version: str, headers: Headers) -> bool:
    """RFC 6455 §4.2.1: an HTTP/1.1 GET with ``Upgrade: websocket`` and the
    ``upgrade`` token in Connection. Any other Upgrade (h2c, ...) is not ours:
    it is dropped as hop-by-hop, as before."""
    if method != "GET" or version != "HTTP/1.1":
        return False
    values = headers.getall("upgrade", ())
    if not any(t.strip().lower() == "websocket" for v in values for t in v.split(",")):
        return False
    return "upgrade" in connection_tokens(headers)


def strip_deflate(offers: str) -> str | None:
    """``Sec-WebSocket-Extensions`` without its permessage-deflate offers
    (RFC 7692 §5): the meter reads frames as sent, so none may be compressed.
    None when nothing is left."""
    kept = [o.strip() for o in offers.split(",") if o.strip()]
    kept = [o for o in kept if o.split(";", 1)[0].strip().lower() != "permessage-deflate"]
    return ", ".join(kept) or None


def extension_names(headers: Headers) -> set[str]:
    return {
        o.split(";", 1)[0].strip().lower()
        for v in headers.getall("sec-websocket-extensions", ())
        for o in v.split(",")
        if o.strip()
    }


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    reason: bytes
    headers: CIMultiDict[str]


class BadResponse(ValueError):
    """The upstream's answer to the upgrade is not HTTP/1.1 we can relay."""


def parse_response_head(data: bytes, max_headers: int = 100) -> ResponseHead:
    """``status-line CRLF *(field-line CRLF) CRLF`` (RFC 9112 §4, §5); ``data``
    ends with the empty line. Controls in a value, obs-fold and bad names are
    refused, so nothing we relay can split the client's response."""
    lines = data[:-4].split(b"\r\n")
    status = _STATUS_LINE.match(lines[0])
    if status is None:
        raise BadResponse("status line")
    if len(lines) - 1 > max_headers:
        raise BadResponse("too many fields")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise BadResponse("field line")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise BadResponse("field value")
        headers.add(name.decode("ascii"), value.decode("latin-1"))
    return ResponseHead(int(status.group(1)), status.group(2) or b"", headers)


def upgrade_accepted(head: ResponseHead, *, metering: bool) -> str | None:
    """Why a 101 cannot be relayed (None: it can). RFC 6455 §4.1: the answer
    must say ``Upgrade: websocket`` and ``Connection: upgrade``. With metering
    on, sidekey removed the deflate offer, so an upstream that still turns
    compression on breaks the protocol and the meter both."""
    if head.status != 101:
        return "not 101"
    if not any(t.strip().lower() == "websocket" for t in head.headers.get("upgrade", "").split(",")):
        return "no Upgrade: websocket"
    if "upgrade" not in connection_tokens(head.headers):
        return "no Connection: upgrade"
    if metering and "permessage-deflate" in extension_names(head.headers):
        return "permessage-deflate though it was not offered"
    return None


def close_frame(code: int, reason: str, *, masked: bool) -> bytes:
    """A close frame from sidekey: masked toward the upstream (we are its
    client, §5.3), unmasked toward the client (we are its server)."""
    return Frame(Opcode.CLOSE, Close(code, reason).serialize()).serialize(mask=masked)


def close_label(code: int | None) -> str:
    """A bounded metric label for a close code: the RFC's codes as numbers,
    registered (3000-3999) and private (4000-4999) codes as a class."""
    if code is None:
        return "none"
    if 1000 <= code <= 1015:
        return str(code)
    if 3000 <= code <= 3999:
        return "3xxx"
    if 4000 <= code <= 4999:
        return "4xxx"
    return "other"


class FrameTracker:
    """Frame boundaries in one direction of a relayed session (§5.2).

    ``feed`` every byte in order; afterwards ``at_boundary`` says whether the
    bytes so far end exactly after a frame. Payloads are skipped, except a
    close frame's (unmasked, for its status code)."""

    __slots__ = ("frames", "bytes", "close_code", "_head", "_left", "_close", "_mask")

    def __init__(self) -> None:
        self.frames = 0  # complete frames
        self.bytes = 0
        self.close_code: int | None = None  # set once a close frame ended (1005: none given)
        self._head = bytearray()  # a header still arriving
        self._left = 0  # payload bytes of the current frame not yet seen
        self._close: bytearray | None = None  # a close frame's payload, arriving
        self._mask = b""

    @property
    def at_boundary(self) -> bool:
        return not self._head and not self._left

    @property
    def close_seen(self) -> bool:
        return self.close_code is not None

    def feed(self, data: bytes) -> None:
        self.bytes += len(data)
        i, n = 0, len(data)
        while i < n:
            if self._left:
                take = min(self._left, n - i)
                if self._close is not None and len(self._close) < _MAX_CONTROL:
                    self._close += data[i : i + min(take, _MAX_CONTROL - len(self._close))]
                i += take
                self._left -= take
                if not self._left:
                    self._end_frame()
                continue
            head = self._head
            need = _header_size(head)
            take = min(need - len(head), n - i)
            head += data[i : i + take]
            i += take
            if len(head) < 2 or len(head) < _header_size(head):
                continue
            self._start_frame(bytes(head))
            head.clear()

    def _start_frame(self, head: bytes) -> None:
        length = head[1] & 0x7F
        offset = 2
        if length == 126:
            (length,) = struct.unpack_from("!H", head, 2)
            offset = 4
        elif length == 127:
            (length,) = struct.unpack_from("!Q", head, 2)
            offset = 10
        self._mask = head[offset : offset + 4] if head[1] & 0x80 else b""
        self._close = bytearray() if head[0] & 0x0F == _OP_CLOSE else None
        self._left = length
        if not length:
            self._end_frame()

    def _end_frame(self) -> None:
        self.frames += 1
        payload = self._close
        if payload is None:
            return
        self._close = None
        if self._mask:
            payload = bytearray(b ^ self._mask[j % 4] for j, b in enumerate(payload))
        self.close_code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else NO_STATUS

    def __repr__(self) -> str:
        return f"FrameTracker(frames={self.frames}, bytes={self.bytes}, close={self.close_code})"


def _header_size(head: bytearray) -> int:
    """Bytes of the frame header that begins ``head`` (2 until its length byte is known)."""
    if len(head) < 2:
        return 2
    length = head[1] & 0x7F
    return 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if head[1] & 0x80 else 0)
