"""The soak's upstream: nginx (Debian's nginx-light) over TLS with a throwaway
CA made for this run. Endpoints (all canned, nothing computed per request):

- ``POST /v1/chat/completions``: a chat completion JSON with ``usage``.
- ``GET /small``: 199 B of JSON.
- ``POST /v1/stream/{short,medium,long}``: OpenAI-shaped SSE streams (files) of
  5, 20 and 60 chunks (~1, 4 and 12 KiB), then a usage chunk and ``data: [DONE]``.
  medium and long are sent at 2 KiB/s (nginx ``limit_rate``), so they arrive in
  bursts about a second apart over ~1-2 s and ~6 s: streams with gaps, not one write.
- ``GET /big``: 1 MiB of random bytes.
- ``GET /ok``, ``/fail/502``, ``/fail/429``: the flaky host's answers (the
  soak's policy routes a second provider here).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

SMALL = (
    '{"id":"soak-small","object":"status","ok":true,"service":"soak-upstream","region":"local",'
    '"ts":1700000000,"pad":"' + "x" * 82 + '"}'
)
CHAT = json.dumps(
    {
        "id": "chatcmpl-soak",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hello from the soak upstream. " * 20},
             "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 24, "completion_tokens": 160, "total_tokens": 184},
    },
    separators=(",", ":"),
)  # fmt: skip
STREAMS = {"short": (5, None), "medium": (20, "2k"), "long": (60, "2k")}  # chunks, nginx limit_rate


def sse_body(chunks: int) -> str:
    head = {"id": "chatcmpl-soak", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-4o-mini"}
    events = []
    for i in range(chunks):
        delta = {"content": f"word{i} and some more text to make the chunk the size of a real one "}
        events.append({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
    usage = {"prompt_tokens": 12, "completion_tokens": chunks * 12, "total_tokens": 12 + chunks * 12}
    events.append({**head, "choices": [], "usage": usage})
    return "".join(f"data: {json.dumps(e, separators=(',', ':'))}\n\n" for e in events) + "data: [DONE]\n\n"


def _quoted(text: str) -> str:
    """An nginx quoted string: JSON has no single quote or $, but escape anyway."""
    assert "'" not in text and "$" not in text
    return "'" + text.replace("\\", "\\\\").replace("\n", "\\n") + "'"


def nginx_conf(run: Path, port: int, ca_dir: Path) -> str:
    streams = ""
    for name, (_, rate) in STREAMS.items():
        # Static files answer POST with 405; error_page turns that into the file (an internal GET).
        limit = f" limit_rate {rate}; limit_rate_after 0;" if rate else ""
        streams += (
            f"        location = /v1/stream/{name} {{ root {run}/www; default_type text/event-stream;{limit}\n"
            f"            add_header Cache-Control no-cache; error_page 405 =200 $uri; }}\n"
        )
    # As root, nginx's workers drop to nobody, who cannot read a private run dir
    # (pytest's tmp_path is 0700): keep them as this user. Loopback only, throwaway.
    user = "user root;" if os.geteuid() == 0 else ""
    return f"""worker_processes 1;
{user}
daemon off;
pid {run}/nginx.pid;
error_log {run}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {run}/client_body;
    proxy_temp_path {run}/proxy_temp;
    fastcgi_temp_path {run}/fastcgi_temp;
    uwsgi_temp_path {run}/uwsgi_temp;
    scgi_temp_path {run}/scgi_temp;
    types {{ }}
    default_type application/json;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    server_tokens off;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {ca_dir}/server.pem;
        ssl_certificate_key {ca_dir}/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SOAKSSL:10m;
        location = /small {{ return 200 {_quoted(SMALL)}; }}
        location = /v1/chat/completions {{ return 200 {_quoted(CHAT)}; }}
{streams}        location = /big {{ default_type application/octet-stream; root {run}/www; }}
        location = /ok {{ return 200 {_quoted(SMALL)}; }}
        location = /fail/502 {{ return 502 '{{"error":{{"message":"scripted bad gateway"}}}}'; }}
        location = /fail/429 {{ return 429 '{{"error":{{"message":"scripted rate limit"}}}}'; }}
    }}
}}
"""


def make_ca(ca_dir: Path) -> None:
    """A throwaway CA and a server certificate for localhost (never committed)."""
    ca_dir.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
            "-keyout", f"{ca_dir}/ca.key", "-out", f"{ca_dir}/ca.pem", "-subj", "/CN=soak throwaway upstream CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-sha256", "-keyout", f"{ca_dir}/server.key",
            "-out", f"{ca_dir}/server.csr", "-subj", "/CN=localhost")  # fmt: skip
    (ca_dir / "server.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
    )
    openssl("x509", "-req", "-in", f"{ca_dir}/server.csr", "-CA", f"{ca_dir}/ca.pem", "-CAkey", f"{ca_dir}/ca.key",
            "-CAcreateserial", "-days", "2", "-sha256", "-extfile", f"{ca_dir}/server.ext",
            "-out", f"{ca_dir}/server.pem")  # fmt: skip


def start_nginx(run: Path, port: int, ca_dir: Path) -> subprocess.Popen[bytes]:
    www = run / "www"
    www.mkdir(parents=True, exist_ok=True)
    (www / "big").write_bytes(os.urandom(1 << 20))
    (www / "v1" / "stream").mkdir(parents=True, exist_ok=True)
    for name, (chunks, _) in STREAMS.items():
        (www / "v1" / "stream" / name).write_text(sse_body(chunks))
    conf = run / "nginx.conf"
    conf.write_text(nginx_conf(run, port, ca_dir))
    log = (run / "nginx.out").open("wb")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(run)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    log.close()
    return proc
