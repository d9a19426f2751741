"""The audit addon: record contents, redaction, the file sink and rotation, without sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addons import audit
from addons.audit import AuditLog
from addons.record_sink import FileSink
from addons.usage.tokens import Usage
from proxy.errors import UpstreamProtocolError, UpstreamTimeout
from proxy.flow import Flow, Response
from proxy.hooks import AddonManager
from proxy.policy import Auth, SecretRef
from proxy.testing import make_flow, make_provider

SECRET = "sk-live-AUDIT-SECRET-0123456789"
T0 = 1_700_000_000.5  # 2023-11-14T22:13:20.500Z

MakeLog = Callable[..., AuditLog]


@pytest.fixture
def make_log() -> Iterator[MakeLog]:
    """AuditLogs closed after the test (filterwarnings=error catches an open file)."""
    logs: list[AuditLog] = []

    def factory(*args: Any, **kwargs: Any) -> AuditLog:
        kwargs.setdefault("clock", lambda: T0)
        log = AuditLog(*args, **kwargs)
        logs.append(log)
        return log

    yield factory
    for log in logs:
        asyncio.run(log.done())


def finished(flow: Flow, status: int = 200) -> Flow:
    flow.response = Response(status)
    flow.timings = {"start": 10.0, "end": 10.25}
    flow.bytes_to_client = 1234
    return flow


def query_provider(param: str = "key") -> Any:
    return make_provider(
        "gemini", ("generativelanguage.googleapis.com",), auth=Auth("query", SecretRef("env", "G"), param=param)
    )


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_record_fields(make_log: MakeLog) -> None:
    flow = finished(make_flow(path="/v1/chat/completions?stream=true"))
    flow.metadata.update(attempts=2, usage=Usage(10, 5, cached_input=2, model="gpt-4o"), cost=0.0012, cache="miss")
    rec = make_log(sink=os.devnull, max_bytes=0).record(flow)
    assert rec == {
        "time": "2023-11-14T22:13:20.500Z",
        "request_id": flow.id,
        "client": "127.0.0.1:50000",
        "method": "POST",
        "host": "api.openai.com",
        "path": "/v1/chat/completions?stream=true",
        "provider": "openai",
        "upstream": "api.openai.com:443",
        "status": 200,
        "duration_ms": 250.0,
        "attempts": 2,
        "tokens": {"input": 10, "output": 5, "cached_input": 2, "reasoning": 0, "estimated": False, "model": "gpt-4o"},
        "cost": 0.0012,
        "cache": "miss",
        "error": None,
        "bytes_out": 1234,
        "intercepted": True,
    }


def test_record_defaults_and_unknown_values(make_log: MakeLog) -> None:
    flow = make_flow()
    flow.client_address = None
    flow.upstream_url = None
    flow.timings = {"start": 1.0}  # no "end" yet

    class Leaky:
        def __str__(self) -> str:
            return SECRET

    flow.metadata["cache"] = Leaky()  # another addon's object: never str()'d
    rec = make_log(sink=os.devnull, max_bytes=0).record(flow)
    assert rec["client"] is None and rec["upstream"] is None and rec["status"] is None
    assert rec["duration_ms"] is None and rec["attempts"] == 1 and rec["tokens"] is None
    assert rec["cache"] is None
    assert SECRET not in audit._dumps(rec)


@pytest.mark.parametrize(
    ("param", "path", "expected"),
    [
        ("key", f"/v1beta/models?key={SECRET}&alt=sse", "/v1beta/models?key=REDACTED&alt=sse"),
        ("auth_code", f"/m?a=1&auth_code={SECRET}&b=2", "/m?a=1&auth_code=REDACTED&b=2"),
        ("auth_code", f"/m?API_KEY={SECRET}&x=1&Token={SECRET}", "/m?API_KEY=REDACTED&x=1&Token=REDACTED"),
        (
            "auth_code",
            f"/m?access-token={SECRET}&sig={SECRET}&signature={SECRET}",
            "/m?access-token=REDACTED&sig=REDACTED&signature=REDACTED",
        ),
        (
            "auth_code",
            f"/m?api%5Fkey={SECRET}&password={SECRET}&secret={SECRET}",
            "/m?api%5Fkey=REDACTED&password=REDACTED&secret=REDACTED",
        ),
        ("auth_code", f"/m?apikey={SECRET}&apikey={SECRET}", "/m?apikey=REDACTED&apikey=REDACTED"),
        ("auth_code", "/m?keyword=kept&monkey=kept&flag", "/m?keyword=kept&monkey=kept&flag"),
    ],
)
def test_query_redaction(make_log: MakeLog, param: str, path: str, expected: str) -> None:
    flow = make_flow(query_provider(param), method="GET", path=path)
    flow.upstream_url = f"https://generativelanguage.googleapis.com{path}&{param}={SECRET}"
    rec = make_log(sink=os.devnull, max_bytes=0).record(flow)
    assert rec["path"] == expected
    assert rec["upstream"] == "generativelanguage.googleapis.com:443"
    assert SECRET not in audit._dumps(rec)


def test_provider_param_only_for_query_auth(make_log: MakeLog) -> None:
    bearer = make_flow(
        make_provider(auth=Auth("bearer", SecretRef("env", "K"), param="auth_code")), path="/m?auth_code=v"
    )
    assert make_log(sink=os.devnull, max_bytes=0).record(bearer)["path"] == "/m?auth_code=v"


def test_error_flow_records_code_and_status(make_log: MakeLog) -> None:
    flow = make_flow()
    flow.error = UpstreamTimeout("openai")
    flow.metadata["attempts"] = 3
    rec = make_log(sink=os.devnull, max_bytes=0).record(flow)
    assert (rec["status"], rec["error"], rec["attempts"]) == (504, "upstream_timeout", 3)


def test_stream_cut_keeps_the_status_the_caller_saw(make_log: MakeLog) -> None:
    flow = finished(make_flow())
    flow.error = UpstreamProtocolError("openai")
    rec = make_log(sink=os.devnull, max_bytes=0).record(flow)
    assert (rec["status"], rec["error"]) == (200, "upstream_protocol_error")


def test_bodies_off_by_default(make_log: MakeLog) -> None:
    flow = make_flow(body=json.dumps({"model": "gpt", "api_key": SECRET}).encode())
    rec = make_log(sink=os.devnull, max_bytes=0).record(flow)
    assert "request_body" not in rec
    assert SECRET not in audit._dumps(rec)


def test_body_nested_redaction(make_log: MakeLog) -> None:
    body = {
        "model": "gpt-4o",
        "max_tokens": 10,
        "Authorization": SECRET,
        "messages": [{"role": "user", "content": "hi", "access_token": SECRET}],
        "tools": [
            {"auth": {"Client-Secret": SECRET, "refresh_token": {"v": SECRET}, "keep": [1, {"PASSWORD": SECRET}]}}
        ],
    }
    rec = make_log(sink=os.devnull, max_bytes=0, log_bodies=True).record(make_flow(body=json.dumps(body).encode()))
    assert rec["request_body"] == {
        "model": "gpt-4o",
        "max_tokens": 10,
        "Authorization": "REDACTED",
        "messages": [{"role": "user", "content": "hi", "access_token": "REDACTED"}],
        "tools": [
            {"auth": {"Client-Secret": "REDACTED", "refresh_token": "REDACTED", "keep": [1, {"PASSWORD": "REDACTED"}]}}
        ],
    }
    assert SECRET not in audit._dumps(rec)


def test_body_truncation(make_log: MakeLog) -> None:
    body = json.dumps({"token": SECRET, "prompt": "é" * 500}).encode()
    rec = make_log(sink=os.devnull, max_bytes=0, log_bodies=True, max_body_log=40).record(make_flow(body=body))
    logged = rec["request_body"]
    assert isinstance(logged, str) and logged.endswith("…(truncated)")
    assert logged == '{"token":"REDACTED","prompt":"éééééééééé…(truncated)'
    assert SECRET not in logged


class _Chunks(AsyncIterator[bytes]):
    async def __anext__(self) -> bytes:
        raise StopAsyncIteration


@pytest.mark.parametrize(
    "body",
    [
        b"\x00\x01binary " + SECRET.encode(),
        b"key=" + SECRET.encode(),  # form-encoded: not parsed, size only
        b"\xff\xfe{}",  # not UTF-8
        b"[" * 100_000,  # too deep for json: size only, no crash
    ],
)
def test_non_json_body_gives_size_only(make_log: MakeLog, body: bytes) -> None:
    rec = make_log(sink=os.devnull, max_bytes=0, log_bodies=True).record(make_flow(body=body))
    assert rec["request_body"] == {"size": len(body)}


def test_empty_body_is_null(make_log: MakeLog) -> None:
    assert make_log(sink=os.devnull, max_bytes=0, log_bodies=True).record(make_flow())["request_body"] is None


def test_streamed_body_is_null(make_log: MakeLog) -> None:
    flow = make_flow()
    flow.request.body = _Chunks()
    assert make_log(sink=os.devnull, max_bytes=0, log_bodies=True).record(flow)["request_body"] is None


def test_secret_everywhere_never_reaches_the_file(make_log: MakeLog, tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    headers = [(name, SECRET) for name in ("Authorization", "x-api-key", "Cookie", "X-Custom", "Proxy-Authorization")]
    body = json.dumps({"model": "m", "key": SECRET, "items": [{"secret": SECRET}]}).encode()
    flow = finished(make_flow(query_provider(), path=f"/v1/models?key={SECRET}&q=1", headers=headers, body=body))
    flow.upstream_url = f"https://user:{SECRET}@generativelanguage.googleapis.com/v1/models?q=1&key={SECRET}"
    flow.response = Response(502)
    flow.response.headers["set-cookie"] = SECRET
    flow.error = UpstreamProtocolError("gemini", detail=SECRET)
    assert SECRET in str(flow.error.fields)  # the secret really is on the error

    log = make_log(str(path), log_bodies=True)
    log.response(flow)
    log.error(flow)
    asyncio.run(log.done())
    text = path.read_text(encoding="utf-8")
    assert SECRET not in text
    assert [r["error"] for r in read_lines(path)] == ["upstream_protocol_error"] * 2


def test_rotation_keeps_backups_and_mode_0600(make_log: MakeLog, tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    old_umask = os.umask(0o277)  # would give 0400 without the explicit chmod
    try:
        log = make_log(str(path), max_bytes=600, backups=2)
        flows = [finished(make_flow()) for _ in range(20)]
        for flow in flows:
            log.response(flow)
        asyncio.run(log.done())
    finally:
        os.umask(old_umask)
    files = [path, path.with_name("audit.log.1"), path.with_name("audit.log.2")]
    assert all(f.exists() for f in files)
    assert not path.with_name("audit.log.3").exists()
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert f.stat().st_size <= 600
    kept = [r["request_id"] for f in reversed(files) for r in read_lines(f)]
    assert kept == [f.id for f in flows][-len(kept) :]  # newest lines, in order
    assert log.statistics()["queued"] == 20


def test_existing_file_is_made_private(make_log: MakeLog, tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_text("old\n")
    path.chmod(0o644)
    asyncio.run(make_log(str(path)).done())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "old\n"  # appended to, never truncated


def test_stdout_sink_one_line_per_flow(make_log: MakeLog, capsys: pytest.CaptureFixture[str]) -> None:
    log = make_log("-")
    flows = [finished(make_flow()) for _ in range(3)]
    log.response(flows[0])
    log.error(flows[1])
    log.response(flows[2])
    asyncio.run(log.done())
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == [f.id for f in flows]
    assert lines[0].startswith('{"time":"2023-11-14T22:13:20.500Z",')  # compact separators


@pytest.mark.asyncio
async def test_a_batch_being_written_at_shutdown_reaches_the_file(make_log: MakeLog, tmp_path: Path) -> None:
    """done() while the worker thread holds a batch not yet written: every line reaches
    the file, in order. The batch is held in its thread until done() has started, which
    on a loaded machine happens by itself: the flush task was cancelled, done() closed
    the file, and the held batch then met a closed file and was lost."""
    path = tmp_path / "audit.log"
    log = make_log(str(path), flush_interval=0.01)
    sink = log._out
    assert isinstance(sink, FileSink)
    real_write = sink.write
    in_thread, release = threading.Event(), threading.Event()

    def held_write(lines: list[str]) -> None:
        if not in_thread.is_set():  # the first batch only
            in_thread.set()
            release.wait(30)
        real_write(lines)

    sink.write = held_write  # type: ignore[method-assign]
    log.running()
    first, second = finished(make_flow()), finished(make_flow())
    log.response(first)
    assert await asyncio.to_thread(in_thread.wait, 30)
    log.response(second)  # still in the buffer when shutdown starts
    stopping = asyncio.create_task(AddonManager([log]).observe("done"))  # as the engine calls it
    await asyncio.sleep(0)  # done() has started (and, before the fix, closed the file)
    release.set()
    await stopping
    assert [r["request_id"] for r in read_lines(path)] == [first.id, second.id]


def test_hooks_never_raise(make_log: MakeLog, caplog: pytest.LogCaptureFixture) -> None:
    log = make_log(sink=os.devnull, max_bytes=0)
    flow = make_flow()
    flow.client_address = (SECRET,)  # type: ignore[assignment]  # malformed: record() raises
    with caplog.at_level(logging.ERROR, logger="sidekey.audit"):
        log.response(flow)
    assert "IndexError" in caplog.text and SECRET not in caplog.text
    asyncio.run(log.done())
    log.response(make_flow())  # after done(): silently nothing


def test_full_queue_drops_and_counts(make_log: MakeLog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "MAX_QUEUED", 0)
    log = make_log(sink=os.devnull, max_bytes=0)
    log.response(make_flow())
    assert (log.statistics()["dropped"], log.statistics()["queued"]) == (1, 0)


@pytest.mark.parametrize("kwargs", [{"max_bytes": -1}, {"backups": 0}, {"max_body_log": -1}])
def test_rejects_bad_settings(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        AuditLog(str(tmp_path / "a.log"), **kwargs)


@given(
    path=st.text(max_size=40).map(lambda s: "/" + s),
    host=st.text(min_size=1, max_size=20),
    status=st.one_of(st.none(), st.integers(100, 599)),
    elapsed=st.one_of(st.none(), st.floats(0, 1000, allow_nan=False)),
    sent=st.integers(0, 10**12),
    intercepted=st.booleans(),
    failed=st.booleans(),
    meta=st.fixed_dictionaries(
        {},
        optional={
            "attempts": st.integers(1, 10),
            "usage": st.builds(
                Usage,
                st.integers(0, 10**7),
                st.integers(0, 10**7),
                st.integers(0, 10),
                st.integers(0, 10),
                estimated=st.booleans(),
                model=st.one_of(st.none(), st.text(max_size=20)),
            ),
            "cost": st.one_of(st.none(), st.floats(0, 100, allow_nan=False), st.integers(0, 5)),
            "reserve": st.integers(0, 100),
        },
    ),
)
@settings(max_examples=300)
def test_fast_line_is_byte_identical_to_the_record(
    path: str,
    host: str,
    status: int | None,
    elapsed: float | None,
    sent: int,
    intercepted: bool,
    failed: bool,
    meta: dict[str, Any],
) -> None:
    log = AuditLog(os.devnull, max_bytes=0, clock=lambda: 1700000000.25)
    flow = make_flow(path=path, host=host)
    if status is not None:
        flow.response = Response(status)
    if elapsed is not None:
        flow.timings["end"] = flow.timings["start"] + elapsed
    if failed:
        flow.error = UpstreamTimeout("openai")
    flow.bytes_to_client, flow.intercepted = sent, intercepted
    flow.metadata.update(meta)
    try:
        assert log.line(flow) == json.dumps(log.record(flow), separators=(",", ":"), ensure_ascii=False)
    finally:
        asyncio.run(log.done())
