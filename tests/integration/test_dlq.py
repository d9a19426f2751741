"""The dead-letter queue through a real sidekey: a request that fails after all
retries is kept (without any credential), survives a restart, and
``sidekey dlq replay`` sends it again through sidekey, which injects the real key."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.fakes.provider import FakeProviderThread, ReceivedRequest
from tests.integration.conftest import (
    OPENAI_KEY,
    PLACEHOLDER,
    QUERY_KEY,
    assert_no_secret,
    curl,
    policy_for,
)
from tests.integration.sidekey_process import REPO, SidekeyProcess


def sidekey_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )


def wait_for_entries(path: Path, count: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            entries = [json.loads(line) for line in path.read_text().splitlines()]
            if len(entries) >= count:
                return entries
        time.sleep(0.05)
    raise AssertionError(f"{path}: fewer than {count} entries after {timeout}s")


def head(result: subprocess.CompletedProcess[str]) -> tuple[int, dict[str, str]]:
    lines = result.stdout.split("\r\n\r\n", 1)[0].splitlines()
    fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()}


def received(fake: FakeProviderThread, prefix: str) -> list[ReceivedRequest]:
    return [r for r in fake.received if r.path.startswith(prefix)]


def test_failed_post_is_kept_survives_restart_and_replays_with_the_real_key(
    start_sidekey: Any, fake: FakeProviderThread, tmp_path: Path
) -> None:
    dlq = tmp_path / "dead.jsonl"
    proxy: SidekeyProcess = start_sidekey(policy_for(fake), args=("--dlq", str(dlq)))
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]})
    # The retrying provider makes 3 attempts: all 3 fail (503 with Retry-After, so a POST
    # is retried); the fourth request to the same URL, the replay, succeeds.
    url = "https://retry.test/flaky/dlq/3?status=503&retry_after=0"
    result = curl(
        proxy, "-i", "-H", f"Authorization: Bearer {PLACEHOLDER}", "-H", "x-api-key: " + PLACEHOLDER,
        "-H", "Content-Type: application/json", "-H", "x-request-tag: t1", "--data-binary", body, url,
    )  # fmt: skip
    status, headers = head(result)
    assert status == 503 and headers["x-sidekey-attempts"] == "3"
    assert [r.header("authorization") for r in received(fake, "/flaky/dlq")] == [f"Bearer {OPENAI_KEY}"] * 3

    [entry] = wait_for_entries(dlq, 1)
    text = dlq.read_text()
    assert_no_secret(text)
    assert PLACEHOLDER not in text
    assert entry["id"] == headers["x-sidekey-request-id"]
    assert (entry["provider"], entry["method"], entry["url"]) == ("retrying", "POST", url)
    assert (entry["status"], entry["error"], entry["body"]) == (503, None, body)
    assert ["x-request-tag", "t1"] in entry["headers"]
    assert entry["attempts"] and all(a.get("status") == 503 for a in entry["attempts"])

    proxy.terminate()
    proxy.start()  # same certs and dead-letter file: the entry is still there, and appended to
    listed = sidekey_cli("dlq", "list", "--dlq", str(dlq), "--json")
    assert listed.returncode == 0, listed.stderr
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [entry["id"]]

    replay = sidekey_cli(
        "dlq", "replay", entry["id"], "--dlq", str(dlq), "--proxy", proxy.url, "--certs", str(proxy.certs)
    )
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert f"replayed {entry['id']}: 200" in replay.stdout
    assert_no_secret(replay.stdout + replay.stderr)
    sent = received(fake, "/flaky/dlq")[3:]
    assert len(sent) == 1
    assert sent[0].method == "POST" and sent[0].query == "status=503&retry_after=0"
    assert sent[0].header("authorization") == f"Bearer {OPENAI_KEY}"  # injected again by sidekey
    assert sent[0].header("x-api-key") is None and sent[0].header("x-request-tag") == "t1"
    assert sent[0].body_sha256 == hashlib.sha256(body.encode()).hexdigest()

    table = sidekey_cli("dlq", "list", "--dlq", str(dlq))
    assert table.returncode == 0
    row = table.stdout.splitlines()[1]
    assert row.startswith(entry["id"]) and row.endswith("-> 200")
    assert len(wait_for_entries(dlq, 2)) == 2  # the entry and its replay mark: no new dead letter
    assert_no_secret(dlq.read_text() + proxy.log())


def test_query_key_and_omitted_body(start_sidekey: Any, fake: FakeProviderThread, tmp_path: Path) -> None:
    dlq = tmp_path / "dead.jsonl"
    proxy: SidekeyProcess = start_sidekey(policy_for(fake), args=("--dlq", str(dlq), "--dlq-body-bytes", "0"))
    result = curl(proxy, "-i", "--data-binary", "payload", f"https://a.query.test/flaky/q/1?key={PLACEHOLDER}&x=1")
    assert head(result)[0] == 503
    [entry] = wait_for_entries(dlq, 1)
    assert entry["url"] == "https://a.query.test/flaky/q/1?x=1"
    assert entry["body_omitted"] == "disabled" and "body" not in entry
    assert QUERY_KEY not in dlq.read_text() and PLACEHOLDER not in dlq.read_text()

    args = ("dlq", "replay", entry["id"], "--dlq", str(dlq), "--proxy", proxy.url, "--certs", str(proxy.certs))
    refused = sidekey_cli(*args)
    assert refused.returncode == 2 and "--without-body" in refused.stderr
    assert len(received(fake, "/flaky/q")) == 1  # nothing was sent

    replay = sidekey_cli(*args, "--without-body")
    assert replay.returncode == 0, replay.stdout + replay.stderr
    sent = received(fake, "/flaky/q")[-1]
    assert sent.query == f"x=1&key={QUERY_KEY}" and sent.body_size == 0
