"""One hot-path function called N times, for callgrind micro-runs (issue #17 item 1):

    for n in 1000 6000; do
      valgrind --tool=callgrind --callgrind-out-file=/tmp/m-$n.out python bench/micro_calls.py TREE head $n
    done   # per call: (Ir at 6000 - Ir at 1000) / 5000

TREE is the checkout whose code runs (old and new side by side); CASE is ``head`` (a loadgen
chat request's head through ``http1.parse_request_head``), ``e2e`` (``http1.end_to_end`` on
that request's fields and nginx's response fields) or ``usage`` (``json_usage`` on the bench
chat answer, read from ANSWER, default /tmp/answer.json: ``curl --cacert /tmp/bench-ca/ca.pem
-d @../shared/bench/payloads/chat-request.json https://localhost:8443/v1/chat/completions``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost:8443\r\nUser-Agent: Go-http-client/1.1\r\n"
    b"Content-Length: 199\r\nContent-Type: application/json\r\nX-Sidekey-Caller: bench-client\r\n"
    b"Accept-Encoding: gzip\r\n\r\n"
)


def case(name: str) -> Callable[[], object]:
    from multidict import CIMultiDict, CIMultiDictProxy

    from proxy import http1

    if name == "head":
        return lambda: http1.parse_request_head(HEAD, 100)
    if name == "e2e":
        import proxy.http_session as session

        request = http1.parse_request_head(HEAD, 100).headers
        response = CIMultiDictProxy(CIMultiDict([
            ("Server", "nginx/1.22.1"), ("Date", "Sat, 05 Dec 2026 12:00:00 GMT"),
            ("Content-Type", "application/json"), ("Content-Length", "1024"), ("Connection", "keep-alive"),
        ]))  # fmt: skip
        drop = session.REQUEST_DROP

        def both() -> None:
            http1.end_to_end(request, drop)
            http1.end_to_end(response)

        return both
    if name == "usage":
        from addons.usage.answers import json_usage

        with open(os.environ.get("ANSWER", "/tmp/answer.json"), "rb") as f:
            body = f.read()
        return lambda: json_usage(body, "openai")
    raise SystemExit(f"unknown case {name!r}: head, e2e or usage")


def main() -> None:
    tree, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sys.path.insert(0, tree)
    call = case(name)
    for _ in range(n):
        call()


if __name__ == "__main__":
    main()
