"""Active health checks and webhook alerts through a real sidekey process."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.fakes.provider import FakeProviderThread
from tests.integration.conftest import OPENAI_KEY, SECRETS, fake_provider, policy_for
from tests.integration.polling import fetch, first_after_the_cooldown

# Long enough that the refusal checked right after the opening failure (one curl run later) still
# falls inside it on a loaded machine, where a curl run can take seconds; the probe is then polled for.
COOLDOWN = 5.0


class Webhook:
    """A plain-HTTP receiver on 127.0.0.1 that records JSON POSTs."""

    def __init__(self) -> None:
        self.alerts: list[dict[str, object]] = []
        self.raw: list[bytes] = []
        self.fail_next = 0  # answer this many with 500 first (the sender must retry)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if outer.fail_next:
                    outer.fail_next -= 1
                    self.send_response(500)
                else:
                    outer.raw.append(body)
                    outer.alerts.append(json.loads(body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/sidekey"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self) -> list[tuple[object, object]]:
        return [(a["event"], a["upstream"]) for a in self.alerts]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_circuit_changes_are_posted_to_the_webhook(
    start_sidekey: object, fake: FakeProviderThread, webhook: Webhook
) -> None:
    webhook.fail_next = 1  # the first delivery fails: the alert is retried, not lost
    extra = fake_provider(fake, "fragile", "fragile.test", retry="{attempts: 1}",
                          circuit=f"{{failures: 1, cooldown: {COOLDOWN}s}}")  # fmt: skip
    limits = f"alerts: {{webhook: {webhook.url}, attempts: 3, timeout: 10s}}"
    proxy = start_sidekey(policy_for(fake, extra=extra, limits=limits))  # type: ignore[operator]
    url = "https://fragile.test/flaky/w/1"  # fails once, then answers 200
    opened_after = time.monotonic()
    assert fetch(proxy, url).status == 503
    refused = fetch(proxy, url)  # open: answered at once, right after the failure (well inside the cooldown)
    assert '"circuit_open"' in refused.body, f"{time.monotonic() - opened_after:.1f} s after the failure: {refused}"
    wait_for(lambda: len(webhook.alerts) >= 2)
    assert webhook.events() == [("circuit_open", "default"), ("unhealthy", "default")]
    # Refused until the cooldown has passed; then the half-open probe succeeds and closes it.
    assert first_after_the_cooldown(proxy, url, opened_after, COOLDOWN).status == 200
    wait_for(lambda: len(webhook.alerts) >= 4)
    assert webhook.events()[2:] == [("circuit_closed", "default"), ("healthy", "default")]
    first = webhook.alerts[0]
    assert first["provider"] == "fragile" and first["state"]["last_status"] == 503  # type: ignore[index]
    for raw in webhook.raw:
        assert not any(secret.encode() in raw for secret in SECRETS)


def test_active_checks_mark_a_member_unhealthy_and_back(
    start_sidekey: object, fake: FakeProviderThread, webhook: Webhook
) -> None:
    check = "{path: /v1/models, interval: 200ms, timeout: 2s, unhealthy_after: 2, healthy_after: 1}"
    extra = fake_provider(fake, "checked", "checked.test", health_check=check)
    limits = f"alerts: {{webhook: {webhook.url}}}"
    proxy = start_sidekey(policy_for(fake, extra=extra, limits=limits))  # type: ignore[operator]

    def member() -> dict[str, object]:
        providers = httpx.get(proxy.admin_url + "/providers", trust_env=False).json()["providers"]
        [state] = next(p for p in providers if p["name"] == "checked")["upstreams"]
        return state  # type: ignore[no-any-return]

    wait_for(lambda: member()["last_checked"] is not None)
    checks = [r for r in fake.received if r.path == "/v1/models"]
    assert checks and all(r.header("authorization") == f"Bearer {OPENAI_KEY}" for r in checks)  # credential injected
    fake.provider.down = True
    wait_for(lambda: ("unhealthy", "default") in webhook.events())
    assert member()["healthy"] is False
    fake.provider.down = False
    wait_for(lambda: ("healthy", "default") in webhook.events())
    assert member()["healthy"] is True
    assert webhook.alerts[0]["provider"] == "checked"
