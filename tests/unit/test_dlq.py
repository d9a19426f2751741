"""The dead-letter queue: what is kept, what is never kept, the file and reading it back."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import addons.dlq
from addons.dlq import DeadLetters, is_dead_letter, safe_headers
from proxy import cli
from proxy.dlq_store import DeadLetterFile, ReplayRequest, lines_backwards, replay_request, table
from proxy.errors import (
    BadRequest,
    CircuitOpen,
    ClientGone,
    CredentialUnavailable,
    ProxyError,
    UpstreamConnectError,
    UpstreamTimeout,
)
from proxy.flow import Flow, Response
from proxy.policy import Auth, Fallback, Policy, SecretRef
from proxy.testing import make_flow, make_provider

SECRET = "sk-live-DLQ-SECRET-0123456789"
T0 = 1_700_000_000.5  # 2023-11-14T22:13:20.500Z

MakeDLQ = Callable[..., DeadLetters]


@pytest.fixture
def make_dlq(tmp_path: Path) -> Iterator[MakeDLQ]:
    """DeadLetters closed after the test (filterwarnings=error catches an open file)."""
    made: list[DeadLetters] = []

    def factory(path: Path | None = None, **kwargs: Any) -> DeadLetters:
        kwargs.setdefault("clock", lambda: T0)
        kwargs.setdefault("flush_interval", 0.01)
        dlq = DeadLetters(str(path or tmp_path / "dlq.jsonl"), **kwargs)
        made.append(dlq)
        return dlq

    yield factory
    for dlq in made:
        asyncio.run(dlq.done())


def failed(flow: Flow, status: int = 503) -> Flow:
    """As the engine leaves a flow whose upstream answered ``status`` (streamed: body None)."""
    flow.response = Response(status)
    return flow


def errored(flow: Flow, err: ProxyError) -> Flow:
    """As http_session.run_flow leaves a flow that failed before the head was sent."""
    flow.error = err
    flow.response = Response.from_error(err)
    return flow


def answered_locally(flow: Flow, status: int) -> Flow:
    flow.response = Response.make(status, b"{}")
    return flow


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -- what is a dead letter ------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "dead"),
    [
        (lambda f: failed(f, 503), True),
        (lambda f: failed(f, 429), True),
        (lambda f: failed(f, 500), True),
        (lambda f: failed(f, 200), False),
        (lambda f: failed(f, 400), False),
        (lambda f: failed(f, 501), False),  # not in retry.statuses: not a transient failure
        (lambda f: answered_locally(f, 429), False),  # ours (a limiter, say): nothing upstream failed
        (lambda f: errored(f, UpstreamTimeout("openai")), True),
        (lambda f: errored(f, UpstreamConnectError("openai")), True),
        (lambda f: errored(f, CircuitOpen("openai", seconds=3)), True),
        (lambda f: errored(f, ClientGone("openai")), False),
        (lambda f: errored(f, CredentialUnavailable("openai")), False),
        (lambda f: errored(f, BadRequest(reason="x")), False),
    ],
)
def test_what_is_a_dead_letter(outcome: Callable[[Flow], Flow], dead: bool) -> None:
    assert is_dead_letter(outcome(make_flow())) is dead


def test_unmatched_traffic_is_never_kept() -> None:
    flow = failed(make_flow(provider=None, policy=Policy(providers=())))
    assert flow.provider is None
    assert is_dead_letter(flow) is False


def test_upstream_error_mid_stream_keeps_the_upstream_status() -> None:
    flow = failed(make_flow(), 200)
    flow.error = UpstreamTimeout("openai")  # the stream was cut after the head went out
    assert is_dead_letter(flow)


# -- the entry ------------------------------------------------------------------------------


def test_entry_fields(make_dlq: MakeDLQ) -> None:
    body = b'{"model":"gpt-4o","messages":[]}'
    flow = failed(
        make_flow(path="/v1/chat/completions?stream=false", headers=[("Content-Type", "application/json")], body=body)
    )
    flow.metadata["failures"] = [
        {"provider": "openai", "upstream": "key-a", "status": 429},
        {"provider": "openai", "upstream": "key-b", "error": "upstream_timeout"},
        {"provider": "openai", "upstream": "key-a", "status": 503},
    ]
    assert make_dlq().record(flow) == {
        "id": flow.id,
        "time": "2023-11-14T22:13:20.500Z",
        "provider": "openai",
        "method": "POST",
        "url": "https://api.openai.com/v1/chat/completions?stream=false",
        "headers": [["Content-Type", "application/json"]],
        "body": body.decode(),
        "status": 503,
        "error": None,
        "attempts": flow.metadata["failures"],
    }


def test_without_failures_the_final_outcome_is_the_one_attempt(make_dlq: MakeDLQ) -> None:
    dlq = make_dlq()
    assert dlq.record(failed(make_flow(), 429))["attempts"] == [{"provider": "openai", "status": 429}]
    rec = dlq.record(errored(make_flow(), UpstreamTimeout("openai")))
    assert (rec["status"], rec["error"]) == (None, "upstream_timeout")  # our 504 is not the upstream's status
    assert rec["attempts"] == [{"provider": "openai", "error": "upstream_timeout"}]


def test_attempts_keep_only_codes_never_messages(make_dlq: MakeDLQ) -> None:
    flow = failed(make_flow())
    flow.metadata["failures"] = [
        {"provider": "openai", "error": f"timeout talking to https://x/?key={SECRET}", "status": 503},
        {"provider": "openai", "upstream": "key a with spaces", "error": object(), "status": True, "extra": SECRET},
        "not a dict",
    ]
    assert make_dlq().record(flow)["attempts"] == [{"provider": "openai", "status": 503}, {"provider": "openai"}]


@pytest.mark.parametrize(
    "auth",
    [
        Auth("bearer", SecretRef("env", "K")),
        Auth("header", SecretRef("env", "K"), header="x-custom"),
        Auth("basic", SecretRef("env", "K"), username="u"),
        Auth("query", SecretRef("env", "K"), param="Code"),
    ],
    ids=lambda a: a.type,
)
def test_credentials_are_never_stored(make_dlq: MakeDLQ, auth: Auth) -> None:
    """At hook time the request holds the real, injected credential: none of it reaches the file."""
    provider = make_provider(auth=auth, set_headers=[("x-org", SECRET)])
    headers = [
        ("Authorization", f"Bearer {SECRET}"),
        ("x-api-key", SECRET),
        ("Proxy-Authorization", f"Basic {SECRET}"),
        ("x-custom", SECRET if auth.type == "header" else "plain"),
        ("x-org", SECRET),
        ("Cookie", f"session={SECRET}"),
        ("X-Session-Token", SECRET),
        ("X-Goog-Api-Key", SECRET),
        ("Accept", "application/json"),
    ]
    code = SECRET if auth.type == "query" else "plain"
    query = f"?Code={code}&api-version=2024-06-01&API_KEY={SECRET}&refresh_token={SECRET}&X-Amz-Signature={SECRET}"
    flow = failed(make_flow(provider, path="/v1/models" + query, headers=headers))
    flow.upstream_url = f"https://api.openai.com/v1/models?key={SECRET}"  # as credentials.py leaves a query key
    dlq = make_dlq()
    dlq.response(flow)
    line = dlq._buffer[0]
    assert SECRET not in line
    entry = json.loads(line)
    kept = [["Accept", "application/json"]]
    assert entry["headers"] == (kept if auth.type == "header" else [["x-custom", "plain"], *kept])
    kept_query = "api-version=2024-06-01" if auth.type == "query" else "Code=plain&api-version=2024-06-01"
    assert entry["url"] == f"https://api.openai.com/v1/models?{kept_query}"


def test_after_a_failover_the_callers_request_is_kept_and_no_key_of_any_provider(make_dlq: MakeDLQ) -> None:
    fallback = make_provider(
        "other", ("api.other.test",), auth=Auth("header", SecretRef("env", "O"), header="x-pass"),
        set_headers=[("other-version", "1")],
    )  # fmt: skip
    matched = dataclasses.replace(make_provider(), fallbacks=(Fallback("other"),))
    policy = Policy(providers=(matched, fallback))
    body = b'{"model":"gpt-4o"}'
    flow = make_flow(matched, policy=policy, path="/v1/chat/completions", headers=[("Accept", "*/*")], body=body)
    dlq = make_dlq()
    dlq.request(flow)
    # What a failover (attempt_loop) and the fallback's credential do to the request:
    flow.request.body = b'{"model":"other-large"}'
    flow.request.headers["other-version"] = "1"
    flow.request.headers["x-pass"] = SECRET
    dlq.response(failed(flow))
    entry = json.loads(dlq._buffer[0])
    assert (entry["body"], entry["headers"]) == (body.decode(), [["Accept", "*/*"]])
    assert safe_headers(flow) == [["Accept", "*/*"]]  # the rewritten headers: the fallback's key is gone too
    assert not dlq._originals


def test_kept_requests_are_bounded_and_dropped_when_the_flow_ends(
    make_dlq: MakeDLQ, monkeypatch: pytest.MonkeyPatch
) -> None:
    matched = dataclasses.replace(make_provider(), fallbacks=(Fallback("openai"),))
    dlq = make_dlq()
    flows = [make_flow(matched) for _ in range(3)]
    for flow in flows:
        dlq.request(flow)
    dlq.response(failed(flows[0], 200))  # not a dead letter: forgotten all the same
    assert set(dlq._originals) == {flows[1].id, flows[2].id}
    dlq.request(make_flow())  # no fallbacks: nothing to keep
    assert len(dlq._originals) == 2
    monkeypatch.setattr(addons.dlq, "MAX_ORIGINALS", 2)
    newest = make_flow(matched)
    dlq.request(newest)  # a flow that never ended is forgotten first
    assert set(dlq._originals) == {flows[2].id, newest.id}


def test_plain_http_and_odd_ports_keep_their_url(make_dlq: MakeDLQ) -> None:
    flow = failed(make_flow(path="/v1/x?Key=1", port=8443))
    assert make_dlq().record(flow)["url"] == "https://api.openai.com:8443/v1/x"
    flow = failed(make_flow(path="/v1/x", port=80))
    flow.intercepted = False
    assert make_dlq().record(flow)["url"] == "http://api.openai.com/v1/x"


async def _stream() -> Any:
    yield b"x"


@pytest.mark.parametrize(
    ("body", "limit", "expected"),
    [
        (b'{"a":"\xc3\xa9"}', 100, {"body": '{"a":"é"}'}),
        (b"\xff\x00\x01", 100, {"body_base64": base64.b64encode(b"\xff\x00\x01").decode()}),
        (b"x" * 101, 100, {"body_omitted": "too_large"}),
        (b"x" * 100, 100, {"body": "x" * 100}),
        (b"x", 0, {"body_omitted": "disabled"}),
        (b"", 0, {"body": ""}),
    ],
)
def test_body_kept_or_omitted(make_dlq: MakeDLQ, body: bytes, limit: int, expected: dict[str, str]) -> None:
    rec = make_dlq(max_body_bytes=limit).record(failed(make_flow(body=body)))
    assert {k: v for k, v in rec.items() if k.startswith("body")} == expected


def test_streamed_body_is_not_kept(make_dlq: MakeDLQ) -> None:
    flow = failed(make_flow())
    stream = _stream()
    flow.request.body = stream
    rec = make_dlq().record(flow)
    assert rec["body_omitted"] == "streamed" and "body" not in rec
    asyncio.run(stream.aclose())


# -- the file -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_written_soon_after_the_failure_not_only_at_shutdown(make_dlq: MakeDLQ, tmp_path: Path) -> None:
    path = tmp_path / "dlq.jsonl"
    dlq = make_dlq(path)
    dlq.running()
    flow = failed(make_flow())
    dlq.response(flow)
    dlq.response(failed(make_flow(), 200))  # not a dead letter
    for _ in range(200):
        if path.stat().st_size:
            break
        await asyncio.sleep(0.01)
    assert [e["id"] for e in lines(path)] == [flow.id]
    await dlq.done()
    assert dlq.statistics() == {"path": str(path), "written": 1, "pending": 0, "dropped": 0, "lost": 0}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    dlq.response(failed(make_flow()))  # after done(): ignored, not raised
    assert dlq.statistics()["pending"] == 0


@pytest.mark.asyncio
async def test_a_write_in_progress_at_shutdown_is_finished_and_counted(make_dlq: MakeDLQ, tmp_path: Path) -> None:
    """done() while the worker thread is still writing a batch: the batch is counted.
    The write is held in its thread (after the line reached the file) until done() has
    started, which on a loaded machine happens by itself: cancelling the flush task then
    lost the count while the line was in the file."""
    path = tmp_path / "dlq.jsonl"
    dlq = make_dlq(path)
    assert dlq._sink is not None
    real_write = dlq._sink.write
    in_thread, release = threading.Event(), threading.Event()

    def held_write(lines: list[str]) -> None:
        real_write(lines)
        in_thread.set()
        release.wait(30)

    dlq._sink.write = held_write  # type: ignore[method-assign]
    dlq.running()
    flow = failed(make_flow())
    dlq.response(flow)
    assert await asyncio.to_thread(in_thread.wait, 30)
    stopping = asyncio.create_task(dlq.done())
    await asyncio.sleep(0)  # done() has started (and, before the fix, cancelled the flush task)
    release.set()
    await stopping
    assert [e["id"] for e in lines(path)] == [flow.id]
    assert dlq.statistics() == {"path": str(path), "written": 1, "pending": 0, "dropped": 0, "lost": 0}


@pytest.mark.asyncio
async def test_rotation_and_reading_back_newest_first(make_dlq: MakeDLQ, tmp_path: Path) -> None:
    path = tmp_path / "dlq.jsonl"
    dlq = make_dlq(path, max_bytes=1500, backups=2)
    flows = [failed(make_flow(body=b'{"n":%d}' % i)) for i in range(30)]
    for flow in flows:
        dlq.response(flow)
    await dlq.done()
    files = DeadLetterFile(path).files()
    assert files == [path, tmp_path / "dlq.jsonl.1", tmp_path / "dlq.jsonl.2"]
    assert not (tmp_path / "dlq.jsonl.3").exists()
    assert all(f.stat().st_size <= 1500 for f in files)
    store = DeadLetterFile(path)
    got = [letter.id for letter in store.letters()]
    assert len(got) < 30  # the oldest rotated away: bounded
    assert got == [f.id for f in reversed(flows)][: len(got)]
    assert store.skipped == 0
    oldest_kept = store.find(got[-1])
    assert oldest_kept is not None and oldest_kept.entry["body"] == f'{{"n":{30 - len(got)}}}'


@pytest.mark.asyncio
async def test_reopening_appends(make_dlq: MakeDLQ, tmp_path: Path) -> None:
    path = tmp_path / "dlq.jsonl"
    first, second = failed(make_flow()), failed(make_flow())
    dlq = make_dlq(path)
    dlq.response(first)
    await dlq.done()
    dlq = make_dlq(path)  # a restart
    dlq.response(second)
    await dlq.done()
    assert [letter.id for letter in DeadLetterFile(path).letters()] == [second.id, first.id]


def test_corrupt_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "dlq.jsonl"
    good = {"id": "a1", "method": "GET", "url": "https://x/", "headers": []}
    path.write_text(
        "\n".join(
            [
                json.dumps(good),
                "not json",
                '{"id": "no-method"}',
                "[1,2]",
                json.dumps({**good, "id": "b2"}),
                '{"id": "b3", "met',
            ]
        )
        + "\n"
    )
    (tmp_path / "dlq.jsonl.1").write_bytes(b"\xff\xfe garbage\n" + json.dumps({**good, "id": "z0"}).encode() + b"\n")
    store = DeadLetterFile(path)
    assert [letter.id for letter in store.letters()] == ["b2", "a1", "z0"]
    assert store.skipped == 5


@pytest.mark.parametrize("block", [1, 3, 7, 64, 65536])
def test_lines_backwards_for_any_block_size(block: int) -> None:
    data = b"one\ntwo\n\nthree-is-longer\nfour"
    assert list(lines_backwards(io.BytesIO(data), block)) == [b"four", b"three-is-longer", b"two", b"one"]


# -- replay ----------------------------------------------------------------------------------


def entry(**fields: Any) -> dict[str, Any]:
    base = {
        "id": "abc123", "time": "2023-11-14T22:13:20.500Z", "provider": "openai", "method": "POST",
        "url": "https://api.openai.com/v1/chat/completions", "headers": [["Content-Type", "application/json"],
        ["Content-Length", "2"], ["x-request-tag", "t"]], "body": "{}", "status": 503, "error": None,
        "attempts": [{"provider": "openai", "status": 503}],
    }  # fmt: skip
    return {**base, **fields}


def test_replay_request_drops_framing_and_decodes_the_body() -> None:
    assert replay_request(entry()) == ReplayRequest(
        "POST",
        "https://api.openai.com/v1/chat/completions",
        [("Content-Type", "application/json"), ("x-request-tag", "t")],
        b"{}",
    )
    binary = entry(body=None, body_base64=base64.b64encode(b"\x00\xff").decode())
    del binary["body"]
    req = replay_request(binary)
    assert isinstance(req, ReplayRequest) and req.body == b"\x00\xff"


def test_replay_refuses_an_omitted_body_unless_asked() -> None:
    omitted = entry(body_omitted="too_large")
    del omitted["body"]
    reason = replay_request(omitted)
    assert isinstance(reason, str) and "--without-body" in reason and "too_large" in reason
    req = replay_request(omitted, without_body=True)
    assert isinstance(req, ReplayRequest) and req.body is None


def test_replay_marks_show_in_the_listing(tmp_path: Path) -> None:
    path = tmp_path / "dlq.jsonl"
    path.write_text(json.dumps(entry()) + "\n" + json.dumps(entry(id="other")) + "\n")
    store = DeadLetterFile(path)
    store.mark_replayed("abc123", 502, "r1", T0)
    store.mark_replayed("abc123", 200, "r2", T0 + 1)
    letters = {letter.id: letter for letter in DeadLetterFile(path).letters()}
    assert letters["abc123"].replay == {
        "replayed": "abc123",
        "time": "2023-11-14T22:13:21.500Z",
        "status": 200,
        "request_id": "r2",
    }
    assert letters["other"].replay is None
    rows = table([letters["abc123"], letters["other"]])
    assert rows[0].split() == ["ID", "TIME", "PROVIDER", "METHOD", "URL", "RESULT", "ATTEMPTS", "REPLAYED"]
    assert rows[1].split()[-3:] == ["2023-11-14T22:13:21.500Z", "->", "200"]
    assert rows[2].endswith("-")


# -- the CLI (no network: list, and the replay refusals) -------------------------------------


def test_cli_list_and_replay_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "dlq.jsonl"
    omitted = entry(id="big", body_omitted="disabled")
    del omitted["body"]
    path.write_text(json.dumps(entry()) + "\n" + json.dumps(omitted) + "\n")
    assert cli.main(["dlq", "list", "--dlq", str(path), "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["id"] for e in listed] == ["big", "abc123"] and listed[0]["replayed"] is None
    assert cli.main(["dlq", "list", "--dlq", str(path), "--limit", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[1].startswith("big ")

    assert cli.main(["dlq", "replay", "big", "--dlq", str(path), "--certs", str(tmp_path)]) == 2
    assert "--without-body" in capsys.readouterr().err
    assert cli.main(["dlq", "replay", "nope", "--dlq", str(path)]) == 2
    assert "no dead letter nope" in capsys.readouterr().err
    assert cli.main(["dlq", "replay", "abc123", "--dlq", str(path), "--certs", str(tmp_path)]) == 2
    assert "sidekey-ca.pem" in capsys.readouterr().err
    monkeypatch.delenv("SIDEKEY_DLQ", raising=False)
    assert cli.main(["dlq", "list"]) == 2
    assert "--dlq" in capsys.readouterr().err


def test_mark_is_one_private_append(tmp_path: Path) -> None:
    path = tmp_path / "dlq.jsonl"
    DeadLetterFile(path).mark_replayed("x", None, None, time.time())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert DeadLetterFile(path).find("x") is None  # a mark alone is not an entry
