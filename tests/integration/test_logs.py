"""The process log of a real sidekey: JSON or text lines, one access line per
request, DEBUG decisions without secrets, once-only start-up lines.

Each test stops the process (SIGTERM, drain) before reading its log: every
line of the requests it served is written by then, so nothing polls."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.fakes.provider import FakeProviderThread
from tests.integration.conftest import (
    ANTHROPIC_KEY,
    SECRET_ENV,
    SECRETS,
    curl,
    fake_provider,
    policy_for,
)
from tests.integration.sidekey_process import SidekeyProcess

ACCESS_FIELDS = ("request_id", "caller", "method", "host", "path", "provider", "upstream", "status",
                 "duration_ms", "attempts", "error")  # fmt: skip
CALLER_SECRET = "sk-caller-OWN-SECRET-8086"
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")


def request_id(result_stdout: str) -> str:
    """The x-sidekey-request-id of a ``curl -D -`` answer."""
    match = re.search(r"(?im)^x-sidekey-request-id: *(\S+)", result_stdout)
    assert match, result_stdout
    return match.group(1)


def json_lines(proxy: SidekeyProcess) -> list[dict[str, object]]:
    lines = proxy.log().splitlines()
    assert lines
    return [json.loads(line) for line in lines]  # every line, or the test fails here


def access(entries: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    """The access lines, by request id."""
    return {str(e["request_id"]): e for e in entries if e["logger"] == "sidekey.access"}


def test_json_lines_and_one_access_line_per_request(start_sidekey: object, fake: FakeProviderThread) -> None:
    proxy: SidekeyProcess = start_sidekey(policy_for(fake), args=("--log-format", "json"))  # type: ignore[operator]
    chat = curl(proxy, "-D", "-", "-H", f"Authorization: Bearer {CALLER_SECRET}", "-H", "Content-Type: application/json",
                "-d", '{"model": "gpt-x", "messages": []}', "https://api.openai.com/v1/chat/completions")  # fmt: skip
    query = curl(proxy, "-D", "-", f"https://x.query.test/echo/a?token={CALLER_SECRET}&q=hello&flag")
    failed = curl(proxy, "-D", "-", "https://api.anthropic.com/status/500")
    assert proxy.terminate() == 0
    entries = json_lines(proxy)
    for entry in entries:
        assert TIME.match(str(entry["time"])) and entry["level"] in ("DEBUG", "INFO", "WARNING", "ERROR")
        assert isinstance(entry["logger"], str) and isinstance(entry["message"], str)
    lines = access(entries)
    assert len(lines) == 3, lines
    first = lines[request_id(chat.stdout)]
    assert [k for k in first if k in ACCESS_FIELDS] == list(ACCESS_FIELDS)  # all of them, in this order
    assert first["level"] == "INFO"
    assert {k: first[k] for k in ("caller", "method", "host", "path", "provider", "upstream", "status",
                                  "attempts", "error")} == {  # fmt: skip
        "caller": "127.0.0.1", "method": "POST", "host": "api.openai.com", "path": "/v1/chat/completions",
        "provider": "openai", "upstream": "default", "status": 200, "attempts": 1, "error": None,
    }  # fmt: skip
    assert isinstance(first["duration_ms"], float) and first["duration_ms"] >= 0
    # The query keeps its parameter names, never a value (a bare part could be one: dropped).
    second = lines[request_id(query.stdout)]
    assert second["path"] == "/echo/a?token=&q=" and second["provider"] == "querykey"
    assert lines[request_id(failed.stdout)]["status"] == 500
    log = proxy.log()
    for secret in (*SECRETS, CALLER_SECRET, "hello"):
        assert secret not in log


def test_access_line_in_text_mode(start_sidekey: object, fake: FakeProviderThread) -> None:
    proxy: SidekeyProcess = start_sidekey(policy_for(fake))  # type: ignore[operator]
    answer = curl(proxy, "-D", "-", "https://api.openai.com/echo?token=abc")
    assert proxy.terminate() == 0
    lines = [line for line in proxy.log().splitlines() if " INFO sidekey.access: " in line]
    assert len(lines) == 1
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO sidekey\.access: access ", lines[0])
    assert f"request_id={request_id(answer.stdout)} caller=127.0.0.1 method=GET host=api.openai.com " in lines[0]
    assert 'path="/echo?token=" provider=openai upstream=default status=200 duration_ms=' in lines[0]
    assert lines[0].endswith(" attempts=1 error=-")


def test_access_log_off(start_sidekey: object, fake: FakeProviderThread) -> None:
    proxy: SidekeyProcess = start_sidekey(policy_for(fake), args=("--log-format", "json", "--access-log", "off"))  # type: ignore[operator]
    answer = curl(proxy, "-D", "-", "https://api.openai.com/echo")
    assert proxy.terminate() == 0
    entries = json_lines(proxy)
    assert any(request_id(answer.stdout) in str(e["message"]) for e in entries)  # the request went through
    assert access(entries) == {}


def test_debug_shows_the_decisions_and_no_secret(start_sidekey: object, fake: FakeProviderThread) -> None:
    extra = fake_provider(fake, "limited", "limited.test", limits="{requests_per_minute: 1000}", queue_wait="0",
                          retry="{attempts: 2, backoff_base: 10ms, backoff_cap: 20ms}")  # fmt: skip
    proxy: SidekeyProcess = start_sidekey(policy_for(fake, extra=extra), args=("--log-format", "json"))  # type: ignore[operator]
    answer = curl(proxy, "-D", "-", "-H", f"Authorization: Bearer {CALLER_SECRET}",
                  f"https://limited.test/flaky/once/1?api_key={CALLER_SECRET}")  # fmt: skip
    assert "200" in answer.stdout.splitlines()[0]
    assert proxy.terminate() == 0
    flow = request_id(answer.stdout)
    debug = [str(e["message"]) for e in json_lines(proxy) if e["level"] == "DEBUG" and flow in str(e["message"])]
    assert f"flow {flow}: GET limited.test matched provider limited" in debug
    assert f"flow {flow}: limits allow, 0 tokens reserved" in debug
    sent = f"flow {flow}: sending to limited/default (localhost:{fake.port})"
    assert debug.count(sent) == 2  # the member chosen, for each attempt
    assert any(re.fullmatch(rf"flow {flow}: attempt 1 to limited/default failed \(503\): retrying in 0\.0[0-2]\ds", m)
               for m in debug), debug  # fmt: skip
    log = proxy.log()
    for secret in (*SECRETS, CALLER_SECRET):
        assert secret not in log


def test_ca_creation_and_policy_path_logged_once(start_sidekey: object, fake: FakeProviderThread,
                                                 tmp_path: Path) -> None:  # fmt: skip
    certs = tmp_path / "shared-certs"
    first: SidekeyProcess = start_sidekey(policy_for(fake), args=("--certs", str(certs)))  # type: ignore[operator]
    assert first.terminate() == 0
    created = [line for line in first.log().splitlines() if "created CA" in line]
    assert len(created) == 1 and " INFO sidekey.certs: " in created[0] and str(certs / "sidekey-ca.pem") in created[0]
    loaded = [line for line in first.log().splitlines() if f"policy {first.policy_path} (via " in line]
    assert len(loaded) == 1 and " INFO sidekey: " in loaded[0]
    again: SidekeyProcess = start_sidekey(policy_for(fake), args=("--certs", str(certs)))  # type: ignore[operator]
    assert again.terminate() == 0
    assert "created CA" not in again.log()  # the CA exists: loaded, not created


def test_missing_secret_warned_once(start_sidekey: object, fake: FakeProviderThread) -> None:
    env = {k: v for k, v in SECRET_ENV.items() if k != "ANTHROPIC_API_KEY"}
    proxy: SidekeyProcess = start_sidekey(policy_for(fake), env=env)  # type: ignore[operator]
    answer = curl(proxy, "-D", "-", "https://api.anthropic.com/v1/models")
    assert "503" in answer.stdout.splitlines()[0] and "credential_unavailable" in answer.stdout
    assert proxy.terminate() == 0
    warned = [line for line in proxy.log().splitlines() if "ANTHROPIC_API_KEY" in line]
    assert len(warned) == 1, warned
    assert " WARNING sidekey.credentials: provider anthropic: credential source env:ANTHROPIC_API_KEY" in warned[0]
    assert ANTHROPIC_KEY not in proxy.log()
