"""A raw TLS upstream on 127.0.0.1 whose behaviour per request is scripted.

aiohttp servers (tests/fakes) answer correctly or not at all; a fault matrix
needs the broken answers no framework will produce: a reset in the middle of
the head, a body cut short, a handshake that never completes. Each connection
gets its own thread and plain blocking sockets, so a fault is exactly the
bytes written here. The request path names the fault (``/ok``, ``/rst/headers``,
...); a server built with ``stall_handshake=True`` accepts TCP and never sends
a ServerHello.

Every connection and request is recorded (connection id, path, whether the
peer went away while we held it) so tests can assert that sidekey cancelled an
upstream request and did not reuse a connection that was left mid-answer.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import trustme

SSE_EVENT = b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'


@dataclass
class Seen:
    """One request as the upstream saw it."""

    conn_id: int
    method: str
    path: str
    body_size: int
    peer_closed: threading.Event = field(default_factory=threading.Event)


class FaultUpstream:
    def __init__(self, workdir: Path, *, stall_handshake: bool = False) -> None:
        self.ca = trustme.CA()
        self.ca_pem_path = workdir / "fault-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem_path))
        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("localhost").configure_cert(self._ctx)
        self.stall_handshake = stall_handshake
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.connections = 0
        self.seen: list[Seen] = []
        self._open: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> FaultUpstream:
        thread = threading.Thread(target=self._accept_loop, name="fault-upstream", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        # close() alone does not wake a thread blocked in accept() (Linux): each stop then
        # waited out its 5 s join, 15 s a test. shutdown() makes that accept() fail at once.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for sock in list(self._open):
                _close_quietly(sock)
        for thread in list(self._threads):
            thread.join(5)

    def requests(self, path_prefix: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.path.startswith(path_prefix)]

    # -- serving -------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                conn_id = self.connections
                self._open.add(raw)
            thread = threading.Thread(target=self._serve, args=(raw, conn_id), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, raw: socket.socket, conn_id: int) -> None:
        sock = raw
        try:
            if self.stall_handshake:
                _wait_for_peer_close(raw, self._stop)  # TCP accepted, no ServerHello ever
                return
            raw.settimeout(30)
            sock = self._ctx.wrap_socket(raw, server_side=True)  # detaches raw: close sock
            with self._lock:
                self._open.discard(raw)
                self._open.add(sock)
            self._serve_requests(sock, conn_id)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(sock)
            _close_quietly(sock)

    def _serve_requests(self, sock: ssl.SSLSocket, conn_id: int) -> None:
        buf = b""
        while not self._stop.is_set():
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, buf = buf.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            while len(buf) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
            seen = Seen(conn_id, method, path, min(len(buf), length))
            buf = buf[length:]
            with self._lock:
                self.seen.append(seen)
            if not self._answer(sock, seen):
                return

    def _answer(self, sock: ssl.SSLSocket, seen: Seen) -> bool:
        """Write the scripted answer; False when the connection is done."""
        path = seen.path.split("?", 1)[0]
        if path.startswith("/ok"):
            body = b'{"ok":true,"conn":%d}' % seen.conn_id
            sock.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
            )
            return True
        if path.startswith("/rst/before-headers"):
            _reset(sock)
        elif path.startswith("/rst/mid-headers"):
            sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: appl")
            _reset(sock)
        elif path.startswith("/rst/mid-body"):
            sock.sendall(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"partial":')
            _reset(sock)
        elif path.startswith("/rst/mid-stream"):
            sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for _ in range(2):
                sock.sendall(b"%x\r\n%s\r\n" % (len(SSE_EVENT), SSE_EVENT))
            time.sleep(0.2)  # the events reach the client before the reset
            _reset(sock)
        elif path.startswith("/silent"):
            _wait_for_peer_close(sock, self._stop)
            seen.peer_closed.set()
        elif path.startswith("/stream-forever"):  # events every 100 ms until the peer leaves
            sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            try:
                while not self._stop.is_set():
                    sock.sendall(b"%x\r\n%s\r\n" % (len(SSE_EVENT), SSE_EVENT))
                    if _peer_left(sock, 0.1):  # a real server notices close_notify or FIN
                        break
            except OSError:
                pass
            seen.peer_closed.set()
        elif path.startswith("/trickle"):  # the head at once, then the body one byte a second
            body = b'{"a":1}'
            sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body))
            try:
                for i in range(len(body)):
                    sock.sendall(body[i : i + 1])
                    if self._stop.wait(1.0):
                        return False
            except OSError:
                seen.peer_closed.set()
        return False


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST, not FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _peer_left(sock: ssl.SSLSocket, wait: float) -> bool:
    """True once the peer closed (close_notify, FIN or reset) within ``wait``."""
    if not select.select([sock], [], [], wait)[0]:
        return False
    sock.settimeout(0)
    try:
        return sock.recv(4096) == b""
    except ssl.SSLWantReadError:
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(30)


def _wait_for_peer_close(sock: socket.socket, stop: threading.Event) -> None:
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            if not sock.recv(4096):
                return
        except TimeoutError:
            continue
        except (OSError, ssl.SSLError):
            return


def _close_quietly(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv() on it; close() does not
    with contextlib.suppress(OSError):
        sock.close()
