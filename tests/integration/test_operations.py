"""Admin listener, metrics and hot reload against a real sidekey process."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect as ws_connect

from tests.fakes.provider import FakeProviderThread
from tests.integration.conftest import (
    DOWN,
    SECRET_ENV,
    SECRETS,
    assert_no_secret,
    curl,
    extra_provider,
    fake_provider,
    policy_for,
)
from tests.integration.sidekey_process import REPO, SidekeyProcess


def admin_get(proxy: SidekeyProcess, path: str) -> httpx.Response:
    return httpx.get(proxy.admin_url + path, timeout=30, trust_env=False)


def samples(proxy: SidekeyProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = admin_get(proxy, "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def wait_for(predicate: object, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_health_and_readiness(sidekey: SidekeyProcess) -> None:
    assert admin_get(sidekey, "/healthz").json() == {"status": "ok"}
    ready = admin_get(sidekey, "/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True


def test_metrics_count_traffic_with_bounded_labels(sidekey: SidekeyProcess) -> None:
    for _ in range(3):
        assert curl(sidekey, "https://api.openai.com/v1/models").returncode == 0
    curl(sidekey, "https://api.openai.com/status/503")
    got = samples(sidekey)
    ok = (
        "sidekey_requests_total",
        (("method", "GET"), ("outcome", "ok"), ("provider", "openai"), ("status_class", "2xx")),
    )
    assert got[ok] == 3
    assert got[("sidekey_request_duration_seconds_count", (("provider", "openai"),))] == 4
    assert got[("sidekey_overhead_seconds_count", (("provider", "openai"),))] == 4
    assert ("sidekey_build_info", (("version", "0.1.0"),)) in got
    labels = {v for (_name, lbls) in got for _k, v in lbls}
    assert not any("/" in v or "?" in v for v in labels), "a URL became a label"


def test_providers_show_secret_sources_never_values(sidekey: SidekeyProcess) -> None:
    body = admin_get(sidekey, "/providers").text
    assert_no_secret(body)
    providers = {p["name"]: p for p in json.loads(body)["providers"]}
    assert providers["openai"]["auth"] == {"type": "bearer", "secret": "env:OPENAI_API_KEY"}
    assert providers["openai"]["secret_available"] is True
    policy = admin_get(sidekey, "/policy").json()
    digest = hashlib.sha256(sidekey.policy_path.read_bytes()).hexdigest()[:12]
    assert (policy["digest"], policy["schema_version"], policy["version"]) == (digest, 1, digest)  # "version": old name
    assert "loaded_at" in policy
    assert_no_secret(json.dumps(policy))


def test_admin_unreachable_through_the_proxy_port(sidekey: SidekeyProcess) -> None:
    plain = curl(sidekey, f"http://127.0.0.1:{sidekey.admin_port}/metrics")
    assert '"address_blocked"' in plain.stdout
    tunnel = curl(sidekey, f"https://127.0.0.1:{sidekey.admin_port}/metrics")
    assert tunnel.returncode != 0  # CONNECT refused with 403
    loop = curl(sidekey, f"http://127.0.0.1:{sidekey.port}/")
    assert '"address_blocked"' in loop.stdout  # and never into itself


def test_admin_on_non_loopback_without_token_refuses_to_start(tmp_path: Path, fake: FakeProviderThread) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(policy_for(fake))
    cmd = [
        sys.executable,
        "-m",
        "proxy",
        "run",
        "--listen",
        "127.0.0.1:0",
        "--policies",
        str(policy),
        "--certs",
        str(tmp_path / "certs"),
        "--admin",
        "0.0.0.0:0",
    ]
    env = {k: v for k, v in os.environ.items() if k != "SIDEKEY_ADMIN_TOKEN"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "admin token" in result.stderr


def test_admin_token_is_required_when_configured(start_sidekey: object, fake: FakeProviderThread) -> None:
    proxy = start_sidekey(policy_for(fake), env={**SECRET_ENV, "SIDEKEY_ADMIN_TOKEN": "adm-tok-1"})  # type: ignore[operator]
    assert admin_get(proxy, "/providers").status_code == 401
    ok = httpx.get(proxy.admin_url + "/providers", headers={"authorization": "Bearer adm-tok-1"}, trust_env=False)
    assert ok.status_code == 200


def test_reload_on_file_change_signal_and_api(sidekey: SidekeyProcess, fake: FakeProviderThread) -> None:
    def status() -> str:
        return curl(sidekey, "-s", "-o", "/dev/null", "-w", "%{http_code}", "https://new.test/echo").stdout

    assert status() != "200"  # not a provider yet: a blind tunnel to a name that does not resolve
    added = policy_for(fake, extra=fake_provider(fake, "newone", "new.test"))
    sidekey.policy_path.write_text(added)  # the watcher notices within ~1 s
    assert wait_for(lambda: status() == "200")
    # An invalid edit keeps the running policy, logs file:line:field and counts it.
    sidekey.policy_path.write_text(added.replace("type: bearer", "type: nonsense", 1))
    assert wait_for(lambda: "policy reload rejected" in sidekey.log())
    assert f"{sidekey.policy_path}:" in sidekey.log() and ".auth.type:" in sidekey.log()
    assert status() == "200"
    got = samples(sidekey)
    assert got[("sidekey_policy_reloads_total", (("result", "failed"),))] >= 1
    # POST /policy/reload reports the problems; SIGHUP restores a good file.
    api = httpx.post(sidekey.admin_url + "/policy/reload", trust_env=False)
    assert api.status_code == 422 and api.json()["error"]["problems"][0]["field"].endswith("auth.type")
    sidekey.policy_path.write_text(policy_for(fake))
    os.kill(sidekey.pid, signal.SIGHUP)
    assert wait_for(lambda: status() != "200")
    assert_no_secret(sidekey.log())


def test_reload_under_load_loses_no_request(sidekey: SidekeyProcess, fake: FakeProviderThread) -> None:
    failures: list[str] = []
    done = threading.Event()
    count = [0]

    def load() -> None:
        ssl_context = sidekey.client_ssl_context()
        with httpx.Client(proxy=sidekey.url, verify=ssl_context, trust_env=False, timeout=60) as client:
            while not done.is_set():
                r = client.get("https://api.openai.com/echo")
                count[0] += 1
                if r.status_code != 200:
                    failures.append(str(r.status_code))

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    base = policy_for(fake)
    for i in range(10):  # ten reloads, each a real change (a new comment changes the version)
        # Requests in flight across every reload: wait for traffic after each one (not a fixed sleep,
        # which on a loaded machine may pass with no request at all).
        before = count[0]
        sidekey.policy_path.write_text(base + f"# reload {i}\n")
        answer = httpx.post(sidekey.admin_url + "/policy/reload", trust_env=False, timeout=60).raise_for_status().json()
        assert answer["digest"] == hashlib.sha256(sidekey.policy_path.read_bytes()).hexdigest()[:12]
        assert wait_for(lambda before=before: count[0] >= before + 5 or bool(failures))
    done.set()
    for w in workers:
        w.join(60)
    assert count[0] >= 50 and failures == []
    got = samples(sidekey)
    assert got[("sidekey_policy_reloads_total", (("result", "ok"),))] >= 10
    assert f"policy reloaded: digest {answer['digest']}, " in sidekey.log()
    assert not any(s in sidekey.log() for s in SECRETS)


def test_check_against_a_running_sidekey(sidekey: SidekeyProcess, fake: FakeProviderThread, tmp_path: Path) -> None:
    edited = tmp_path / "edited.yaml"
    text = policy_for(fake).replace("read: 5", "read: 7")  # openai changes
    text = text.replace("  querykey:", "  renamed:")  # querykey removed, renamed added
    edited.write_text(text)
    cmd = [sys.executable, "-m", "proxy", "check", str(edited), "--against", sidekey.admin_url]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "  + renamed" in lines and "  - querykey" in lines
    assert "  ~ openai (timeouts)" in lines
    running = hashlib.sha256(sidekey.policy_path.read_bytes()).hexdigest()[:12]
    assert f"against {sidekey.admin_url} (running content digest {running}):" in lines
    assert "anthropic (" not in result.stdout


def test_secrets_sweep_logs_audit_metrics_and_admin(
    start_sidekey: object, fake: FakeProviderThread, tmp_path: Path
) -> None:
    """Secrets everywhere a caller or upstream can put them; none may reach
    the process log (DEBUG), the audit log (bodies on), metrics or the admin API."""
    caller_secret = "sk-caller-OWN-SECRET-5150"
    audit = tmp_path / "audit.jsonl"
    extra = extra_provider("down", "down.test", DOWN, auth="{type: query, param: key, secret: env:QUERY_API_KEY}")
    proxy = start_sidekey(policy_for(fake, extra=extra), args=("--audit", str(audit), "--audit-bodies"))  # type: ignore[operator]
    body = json.dumps({"model": "gpt-x", "api_key": caller_secret, "messages": [{"role": "user", "content": "hi"}]})
    calls = [
        ("-H", f"Authorization: Bearer {caller_secret}", "-H", f"X-Api-Key: {caller_secret}",
         "-H", "Content-Type: application/json", "-d", body, "https://api.openai.com/v1/chat/completions"),
        (f"https://api.openai.com/echo?token={caller_secret}&q=1",),
        (f"https://x.query.test/echo?key={caller_secret}",),  # the fake echoes our real query key back
        (f"http://x.query.test/status/500?api_key={caller_secret}",),
        (f"https://down.test/v1/x?key={caller_secret}",),  # connect error with a query credential
        ("-H", f"Cookie: session={caller_secret}", "https://api.anthropic.com/status/401"),
    ]  # fmt: skip
    for args in calls:
        curl(proxy, *args)
    curl(proxy, "-o", "/dev/null", "https://api.openai.com/cut/50000")
    # A WebSocket session (#14): the caller's key on the upgrade, in its query and in a frame.
    with ws_connect(f"wss://api.openai.com/v1/realtime?model=gpt-x&api_key={caller_secret}", proxy=proxy.url,
                    ssl=proxy.client_ssl_context(), compression=None, open_timeout=60,
                    additional_headers={"Authorization": f"Bearer {caller_secret}"}) as ws:  # fmt: skip
        ws.send(json.dumps({"type": "response.create", "api_key": caller_secret}))
        while json.loads(ws.recv(timeout=60))["type"] != "response.done":
            pass
    lines = len(calls) + 3  # one per call, the cut download, the session's open and close
    wait_for(lambda: audit.exists() and len(audit.read_text().splitlines()) >= lines)
    surfaces = {
        "log": proxy.log(),
        "audit": audit.read_text(),
        "metrics": admin_get(proxy, "/metrics").text,
        "providers": admin_get(proxy, "/providers").text,
        "policy": admin_get(proxy, "/policy").text,
    }
    assert len(surfaces["audit"].splitlines()) == lines
    assert '"REDACTED"' in surfaces["audit"]
    for name, text in surfaces.items():
        for secret in (*SECRETS, caller_secret):
            assert secret not in text, f"a secret reached the {name}"
