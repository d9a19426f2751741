"""Placeholders anywhere in the request (#13 item 4), through the real sidekey
process with real clients (curl, httpx) and the fake provider over TLS:

- a Slack-style webhook whose path is the secret (from a fake Vault over TLS);
- substitution in the query, a header, a JSON body and a form body;
- a misdirected name refused with 403 ``placeholder_misdirected`` and a
  security log line: to another provider's host, to an intercepted host
  whose provider owns no placeholder, to an unmatched host over plain http,
  and as another provider's name inside an ordinary message to the right host;
- a string that merely looks like one passes untouched;
- a rotated file source is picked up;
- /providers shows each placeholder's source and state;
- the sweep: no value in the DEBUG log, audit (bodies on), dead letters,
  metrics, /providers or any error body.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qsl

import httpx

from tests.fakes.provider import FakeProviderThread
from tests.fakes.stores import FakeVault
from tests.integration.conftest import OPENAI_KEY, SECRET_ENV, curl
from tests.integration.polling import DEADLINE, wait_for
from tests.integration.sidekey_process import SidekeyProcess

HOOK = "SIDEKEY_SLACK_WEBHOOK_TOKEN"
SIGNING = "SIDEKEY_SLACK_SIGNING_KEY"
GH = "SIDEKEY_GITHUB_TOKEN_MAIN"
ROTATING = "SIDEKEY_ROTATING_FILE_KEY"
HOOK_VALUE = "T0000SWEEP/B0000SWEEP/xoxWEBHOOKsweep1234"
SIGNING_VALUE = "slack-SIGNING-sweep-5678"
GH_VALUE = "ghp_SWEEPgithubtoken9012"
FILE_V1, FILE_V2 = "file-SWEEP-v1-aaaa", "file-SWEEP-v2-bbbb"
SECRET_ID = "approle-PH-SWEEP-3456"

APPROLE = "{method: approle, role_id: sidekey, secret_id: env:VAULT_SECRET_ID}"


def policy(fake: FakeProviderThread, vault: FakeVault, rotating: Path) -> str:
    tls = f"tls: {{ca_bundle: {fake.ca_pem_path}}}"
    echo = f"https://localhost:{fake.port}/echo"
    return f"""\
version: 1
secret_stores:
{vault.store_yaml(APPROLE)}providers:
  slack:
    hosts: [hooks.slack.test]
    upstream: https://localhost:{fake.port}
    auth: {{type: none}}
    {tls}
    retry: {{attempts: 1}}
    placeholders:
      {HOOK}: "vault:secret/data/slack#webhook"
      {SIGNING}: env:SLACK_SIGNING
      {ROTATING}: file:{rotating}
  github:
    hosts: [api.github.test]
    upstream: {echo}
    auth: {{type: bearer, secret: env:OPENAI_API_KEY}}
    {tls}
    retry: {{attempts: 1}}
    placeholders:
      {GH}: env:GH_TOKEN
  plain:
    hosts: [plain.test]
    upstream: {echo}
    auth: {{type: none}}
    {tls}
    retry: {{attempts: 1}}
"""


def client(proxy: SidekeyProcess) -> httpx.Client:
    return httpx.Client(proxy=proxy.url, verify=proxy.client_ssl_context(), timeout=DEADLINE, trust_env=False)


def refused(answer: httpx.Response, name: str, host: str) -> None:
    assert answer.status_code == 403, answer.text
    assert answer.headers["x-sidekey-error"] == "placeholder_misdirected"
    assert answer.json()["error"]["message"] == f"placeholder {name} does not belong to host {host}"


def test_placeholders_substituted_refused_rotated_and_never_leaked(start_sidekey: object, fake: FakeProviderThread,
                                                                   tmp_path: Path) -> None:  # fmt: skip
    rotating = tmp_path / "rotating"
    rotating.write_text(FILE_V1 + "\n")
    audit, dlq = tmp_path / "audit.jsonl", tmp_path / "dlq.jsonl"
    with FakeVault() as vault:
        vault.put("secret", "slack", {"webhook": HOOK_VALUE})
        vault.approles["sidekey"] = SECRET_ID
        env = {**SECRET_ENV, "VAULT_SECRET_ID": SECRET_ID, "SLACK_SIGNING": SIGNING_VALUE, "GH_TOKEN": GH_VALUE}
        proxy: SidekeyProcess = start_sidekey(policy(fake, vault, rotating), env=env, args=(
            "--audit", str(audit), "--audit-bodies", "--dlq", str(dlq)))  # type: ignore[operator]  # fmt: skip
        with client(proxy) as http:
            # The Slack-style webhook: the secret is the path (three segments of it). (The fake
            # echoes what it got under /echo/.)
            answer = http.post(f"https://hooks.slack.test/echo/services/{HOOK}", json={"text": "deploy done"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["path"] == f"/echo/services/{HOOK_VALUE}"
            assert fake.last().body_json == {"text": "deploy done"}

            # Query, header, JSON body, form body (the secret where the name was, escaped for the place).
            answer = http.post(
                f"https://hooks.slack.test/echo/api/x?sig={SIGNING}&keep=SIDEKEY_LOOKS_LIKE_ONE",
                headers={"X-Slack-Signature": f"v0={SIGNING}", "Authorization": f"Bearer {HOOK}"},
                json={"token": HOOK, "blocks": [{"text": f"key {SIGNING} here"}], "note": "SIDEKEY_NOT_A_NAME_1"},
            )
            assert answer.status_code == 200, answer.text
            seen = fake.last()
            assert seen.query == f"sig={SIGNING_VALUE}&keep=SIDEKEY_LOOKS_LIKE_ONE"
            assert seen.header("X-Slack-Signature") == f"v0={SIGNING_VALUE}"
            assert seen.header("Authorization") == f"Bearer {HOOK_VALUE}"  # auth none: the caller's, put in
            assert seen.body_json == {"token": HOOK_VALUE, "blocks": [{"text": f"key {SIGNING_VALUE} here"}],
                                      "note": "SIDEKEY_NOT_A_NAME_1"}  # fmt: skip
            form = {"client_id": "app", "client_secret": GH, "scope": "a b+c"}
            answer = http.post("https://api.github.test/oauth/token", data=form)
            assert answer.status_code == 200, answer.text
            seen = fake.last()
            assert seen.header("Authorization") == f"Bearer {OPENAI_KEY}"  # the provider's own auth still wins
            assert seen.body is not None
            assert dict(parse_qsl(seen.body.decode())) == {**form, "client_secret": GH_VALUE}
            assert seen.body.startswith(b"client_id=app&client_secret=") and seen.body.endswith(b"&scope=a+b%2Bc")

            # Misdirected: to another provider's host, in any place.
            received = len(fake.received)
            refused(http.get(f"https://api.github.test/repos?token={HOOK}"), HOOK, "api.github.test")
            refused(http.post("https://hooks.slack.test/services/x", json={"text": f"use {GH} please"}), GH,
                    "hooks.slack.test")  # fmt: skip
            # ... to an intercepted host whose provider owns no placeholder (an upstream 'unmatched' by them)
            refused(http.get("https://plain.test/x", headers={"X-Key": SIGNING}), SIGNING, "plain.test")
            # ... and over plain http to a host no provider matches (never forwarded: nothing listens there)
            refused(http.get(f"http://unmatched.invalid/hook/{HOOK}"), HOOK, "unmatched.invalid")
            assert len(fake.received) == received, "a refused request reached an upstream"
            log = proxy.log()
            assert (f"placeholder_misdirected: placeholder {HOOK} of provider slack sent to host api.github.test"
                    in log)  # fmt: skip
            assert f"placeholder {GH} of provider github sent to host hooks.slack.test" in log
            assert f"placeholder {HOOK} of provider slack sent to host unmatched.invalid" in log

            # Plain http to the owner's own host: put in, and sent upstream over TLS like any request to it.
            answer = http.get(f"http://hooks.slack.test/echo/plain?k={SIGNING}")
            assert answer.status_code == 200 and fake.last().query == f"k={SIGNING_VALUE}" and fake.last().sni

            # A lookalike passes untouched, to any host.
            answer = http.get("https://plain.test/x?q=SIDEKEY_LOOKS_LIKE_ONE", headers={"X-A": "XSIDEKEY_GITHUB_T"})
            assert answer.status_code == 200 and fake.last().query == "q=SIDEKEY_LOOKS_LIKE_ONE"

            # curl too, the webhook as a shell script would call it
            done = curl(proxy, "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "content-type: application/json",
                        "-d", '{"text":"from curl"}', f"https://hooks.slack.test/echo/services/{HOOK}")  # fmt: skip
            assert done.stdout == "200" and fake.last().path == f"/echo/services/{HOOK_VALUE}"

            # Rotation of the file source: picked up by the 1 s re-read, no restart.
            assert http.get(f"https://hooks.slack.test/echo/r?k={ROTATING}").status_code == 200
            assert fake.last().query == f"k={FILE_V1}"
            rotating.write_text(FILE_V2 + "\n")

            def rotated() -> bool:
                http.get(f"https://hooks.slack.test/echo/r?k={ROTATING}")
                return fake.last().query == f"k={FILE_V2}"

            assert wait_for(rotated), "the rotated file value was not picked up"

            # A dead letter with placeholders (the upstream fails): its entry keeps the names only.
            assert http.post(f"https://hooks.slack.test/status/500?k={SIGNING}", headers={"X-Sig": SIGNING},
                             json={"t": HOOK}).status_code == 500  # fmt: skip
            stats = httpx.get(proxy.admin_url + "/metrics", timeout=DEADLINE, trust_env=False).text
            # /providers: each placeholder's source and state, never its value.
            admin = httpx.get(proxy.admin_url + "/providers", timeout=DEADLINE, trust_env=False).text
            views = {p["name"]: p for p in json.loads(admin)["providers"]}
            sources = {c["source"]: c for c in views["slack"]["credentials"]}
            vaulted = sources["vault:secret/data/slack#webhook"]
            assert vaulted["placeholders"] == [HOOK] and vaulted["state"] == "fresh" and vaulted["members"] == []
            assert sources[f"file:{rotating}"]["placeholders"] == [ROTATING]
        assert wait_for(lambda: dlq.exists() and SIGNING in dlq.read_text()), "the dead letter was not written"
        proxy.stop()  # before the vault closes; flushes audit
    surfaces = {"log": proxy.log(), "audit": audit.read_text(), "dlq": dlq.read_text(), "metrics": stats,
                "providers": admin}  # fmt: skip
    assert HOOK in surfaces["audit"] and json.loads(dlq.read_text().splitlines()[-1])["url"].endswith(f"k={SIGNING}")
    for where, text in surfaces.items():
        for secret in (HOOK_VALUE, SIGNING_VALUE, GH_VALUE, FILE_V1, FILE_V2, SECRET_ID, *vault.tokens, OPENAI_KEY):
            assert secret not in text, f"a secret reached the {where}"


def test_a_fallback_provider_never_gets_the_value(start_sidekey: object, fake: FakeProviderThread) -> None:
    """The matched provider is down and falls back to another: the attempt to the
    fallback is refused (its host is not the placeholder's), nothing reaches it."""
    tls = f"tls: {{ca_bundle: {fake.ca_pem_path}}}"
    policy_text = f"""\
version: 1
providers:
  hooks:
    hosts: [hooks.down.test]
    upstream: https://127.0.0.1:9
    auth: {{type: none}}
    {tls}
    timeouts: {{connect: 2, read: 5}}
    retry: {{attempts: 1}}
    fallbacks:
      - provider: backup
    placeholders:
      {HOOK}: env:SLACK_HOOK
  backup:
    hosts: [backup.test]
    upstream: https://localhost:{fake.port}
    auth: {{type: none}}
    {tls}
    retry: {{attempts: 1}}
"""
    proxy: SidekeyProcess = start_sidekey(policy_text, env={**SECRET_ENV, "SLACK_HOOK": HOOK_VALUE})  # type: ignore[operator]
    with client(proxy) as http:
        assert http.get("https://hooks.down.test/echo/plain").status_code == 200  # no placeholder: it fails over
        received = len(fake.received)
        refused(http.post(f"https://hooks.down.test/echo/services/{HOOK}", json={"t": 1}), HOOK, "localhost")
        assert len(fake.received) == received, "the fallback got the request"
    proxy.stop()
    assert HOOK_VALUE not in proxy.log()
    assert f"placeholder {HOOK} of provider hooks sent to host localhost" in proxy.log()
