"""Garbage at the listener: whatever arrives, sidekey answers or closes, and
keeps serving. Hypothesis generates the inputs; the process is real."""

from __future__ import annotations

import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import curl
from tests.integration.sidekey_process import SidekeyProcess

METHODS = st.sampled_from(["GET", "POST", "CONNECT", "PUT", "G\x00T", "", "HEAD"])
TARGETS = st.sampled_from(
    ["http://api.openai.com/v1/models", "api.openai.com:443", "/", "*", "http://[::1", "http://a:99999/", "\r\n"]
)
FIELDS = st.lists(st.tuples(st.text(min_size=0, max_size=12), st.text(min_size=0, max_size=40)), max_size=8)


def send(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while piece := s.recv(65536):
                out += piece
        except (ConnectionResetError, TimeoutError):
            pass
    return out


def assert_survived(proxy: SidekeyProcess, reply: bytes) -> None:
    assert reply == b"" or reply.startswith(b"HTTP/1.1 ")
    assert proxy.proc is not None and proxy.proc.poll() is None
    log = proxy.log()
    assert "Traceback" not in log
    assert "connection failed" not in log  # every bad input took a planned path


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(method=METHODS, target=TARGETS, fields=FIELDS, tail=st.binary(max_size=64))
def test_structured_garbage(
    sidekey: SidekeyProcess, method: str, target: str, fields: list[tuple[str, str]], tail: bytes
) -> None:
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields) + "\r\n"
    reply = send(sidekey.port, head.encode("utf-8", "surrogateescape") + tail)
    assert_survived(sidekey, reply)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(min_size=1, max_size=512))
def test_raw_bytes(sidekey: SidekeyProcess, data: bytes) -> None:
    reply = send(sidekey.port, data)
    assert_survived(sidekey, reply)


def test_still_serving_after_fuzzing(sidekey: SidekeyProcess) -> None:
    for data in (b"\x16\x03\x01\x00\x05hello", b"CONNECT a:1 HTTP/1.1\r\n\r\n\x00\x00", b"GET http://x/ HTTP/1.1\r\n"):
        send(sidekey.port, data)
    assert curl(sidekey, "-s", "-o", "/dev/null", "-w", "%{http_code}", "https://api.openai.com/echo").stdout == "200"
    log = sidekey.log()
    assert "Traceback" not in log
    assert "connection failed" not in log  # every bad input took a planned path
