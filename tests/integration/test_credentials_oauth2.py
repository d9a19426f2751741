"""OAuth2 access tokens through a real sidekey: one token fetch under 100
concurrent first requests, refresh in the background with requests flowing,
the token endpoint down at refresh time (the old token until it expires,
then 503 credential_refresh_failed, then recovery), the refresh_token grant
with rotation, and a token URL at a metadata address refused."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.fakes.provider import FakeProviderThread
from tests.fakes.stores import FakeTokenEndpoint
from tests.integration.conftest import SECRET_ENV
from tests.integration.polling import DEADLINE, fetch
from tests.integration.sidekey_process import SidekeyProcess

CLIENT_SECRET = "oauth-CLIENT-SECRET-3c4d5e"
FIRST_REFRESH_TOKEN = "rt-FIRST-REFRESH-9f8e7d"
ENV = {**SECRET_ENV, "OAUTH_CLIENT_SECRET": CLIENT_SECRET, "OAUTH_REFRESH_TOKEN": FIRST_REFRESH_TOKEN}


def oauth_provider(fake: FakeProviderThread, name: str, endpoint: FakeTokenEndpoint | None, extra: str = "",
                   token_url: str | None = None) -> str:  # fmt: skip
    url = token_url or (endpoint.token_url if endpoint else "")
    ca = f", ca_bundle: {endpoint.ca_pem_path}" if endpoint else ""
    return f"""\
  {name}:
    hosts: [api.{name}.test]
    upstream: https://localhost:{fake.port}
    auth: {{type: oauth2, token_url: "{url}", client_id: sidekey-app, client_secret: env:OAUTH_CLIENT_SECRET{ca}{extra}}}
    tls: {{ca_bundle: {fake.ca_pem_path}}}
    retry: {{attempts: 1}}
"""


def credential_state(proxy: SidekeyProcess) -> str:
    providers = httpx.get(proxy.admin_url + "/providers", timeout=DEADLINE, trust_env=False).json()["providers"]
    [view] = [p for p in providers if p["name"] == "short"]
    return str(view["credentials"][0]["state"])


def wait_until(check: object, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


async def burst(proxy: SidekeyProcess, url: str, n: int) -> list[httpx.Response]:
    ctx = ssl.create_default_context(cafile=str(proxy.ca_path))
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(proxy=proxy.url, verify=ctx, timeout=DEADLINE, limits=limits) as client:
        return await asyncio.gather(*(client.get(url) for _ in range(n)))


@pytest.fixture
def endpoint() -> Iterator[FakeTokenEndpoint]:
    with FakeTokenEndpoint("sidekey-app", CLIENT_SECRET) as ep:
        yield ep


def test_one_fetch_for_100_first_requests_rotation_grant_and_metadata_guard(
    start_sidekey: object, fake: FakeProviderThread, endpoint: FakeTokenEndpoint
) -> None:
    endpoint.delay = 0.5  # every first request arrives while the one fetch is in flight
    with FakeTokenEndpoint("sidekey-app", CLIENT_SECRET, expires_in=2) as rotating:
        rotating.refresh_tokens.add(FIRST_REFRESH_TOKEN)
        rotating.rotate = True
        grant = ", grant: refresh_token, refresh_token: env:OAUTH_REFRESH_TOKEN"
        policy = "version: 1\nproviders:\n" + oauth_provider(fake, "burst", endpoint) + oauth_provider(
            fake, "rotating", rotating, grant) + oauth_provider(
            fake, "metadata", None, token_url="https://169.254.169.254/oauth/token")  # fmt: skip
        proxy: SidekeyProcess = start_sidekey(policy, env=ENV)  # type: ignore[operator]
        assert endpoint.issued == [], "fetched on first use, not at start"

        answers = asyncio.run(burst(proxy, "https://api.burst.test/echo", 100))
        assert [a.status_code for a in answers] == [200] * 100
        assert len(endpoint.issued) == 1, "one token fetch for 100 concurrent first requests"
        token = endpoint.issued[0]
        assert {r.header("Authorization") for r in fake.provider.received} == {f"Bearer {token}"}
        assert endpoint.forms == [{"grant_type": "client_credentials"}]  # client_secret_basic: not in the form

        # refresh_token grant: each refresh must use the refresh token the last answer rotated in
        assert fetch(proxy, "https://api.rotating.test/echo").status == 200
        wait_until(lambda: len(rotating.issued) >= 3, "two background refreshes")
        assert fetch(proxy, "https://api.rotating.test/echo").status == 200
        assert fake.last().header("Authorization") in {f"Bearer {t}" for t in rotating.issued[-2:]}
        assert rotating.forms[0]["refresh_token"] == FIRST_REFRESH_TOKEN
        assert all(f["refresh_token"] != FIRST_REFRESH_TOKEN for f in rotating.forms[1:])

        refused = fetch(proxy, "https://api.metadata.test/echo")
        assert refused.status == 503 and json.loads(refused.body)["error"]["code"] == "credential_refresh_failed"
        assert "169.254.169.254 is a blocked address" in proxy.log()
        proxy.stop()  # before the token endpoints close
    log = proxy.log()
    for secret in (CLIENT_SECRET, FIRST_REFRESH_TOKEN, *endpoint.issued, *rotating.issued, *rotating.refresh_tokens):
        assert secret not in log


def test_refresh_with_requests_flowing_then_endpoint_down_then_back(
    start_sidekey: object, fake: FakeProviderThread
) -> None:
    with FakeTokenEndpoint("sidekey-app", CLIENT_SECRET, expires_in=6) as endpoint:
        proxy: SidekeyProcess = start_sidekey("version: 1\nproviders:\n" + oauth_provider(fake, "short", endpoint),
                                              env=ENV)  # type: ignore[operator]  # fmt: skip
        url = "https://api.short.test/echo"
        flowing_until = time.monotonic() + 4  # past one refresh (at half of 6 s)
        statuses = []
        while time.monotonic() < flowing_until or len(endpoint.issued) < 2:
            statuses.append(fetch(proxy, url).status)
            assert time.monotonic() < flowing_until + DEADLINE
        assert set(statuses) == {200}, "no request fails across a refresh"
        used = {r.header("Authorization") for r in fake.provider.received}
        assert len(used) >= 2, "a refreshed token was used"

        endpoint.pause()
        last = endpoint.issued[-1]
        # The refresh fails: the admin API says stale, and the old token is still served ...
        wait_until(lambda: credential_state(proxy) != "fresh", "a failed refresh")
        answer = fetch(proxy, url)
        assert answer.status == 200 or credential_state(proxy) == "failing", "served while stale"
        # ... until it expires; then refused, never served again before the endpoint is back.
        statuses = []

        def refused_now() -> bool:
            statuses.append(fetch(proxy, url).status)
            return statuses[-1] == 503

        wait_until(refused_now, "the refusal")
        assert set(statuses[:-1]) <= {200}, "the old token until the refusal, nothing else"
        assert credential_state(proxy) == "failing"
        assert fetch(proxy, url).status == 503
        refused = fetch(proxy, url)
        assert json.loads(refused.body)["error"]["code"] == "credential_refresh_failed"
        assert fake.last().header("Authorization") == f"Bearer {last}", "the old token was served until expiry"
        endpoint.resume()
        wait_until(lambda: fetch(proxy, url).status == 200, "recovery without a restart")
        assert endpoint.issued[-1] != last
        proxy.stop()
    for secret in (CLIENT_SECRET, *endpoint.issued):
        assert secret not in proxy.log()
