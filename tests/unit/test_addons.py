"""The hook pipeline and the built-in addons, without sockets."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import pytest
from multidict import CIMultiDict

from addons import default_addons, load_addons
from addons.access_log import AccessLog
from addons.cache.addon import Cache
from addons.credentials import CredentialInjector, strip_query_param
from addons.health import HealthChecks
from addons.limits import Limits
from addons.metrics import Metrics
from addons.placeholders import Placeholders
from addons.provider_headers import ProviderHeaders
from addons.signing import AwsSigner
from addons.usage import UsageMeter
from proxy.attempt import Attempt
from proxy.balance import UpstreamState
from proxy.errors import AddonFailed, CredentialUnavailable
from proxy.flow import Flow, Response
from proxy.hooks import AddonManager
from proxy.policy import Auth, Policy, SecretRef, Target
from proxy.secrets import SecretStore
from proxy.testing import make_flow, make_provider

SECRET = "sk-live-REAL-0123456789"
PLACEHOLDER = "sk-placeholder"


async def injector_with(env: dict[str, str], *providers: object) -> CredentialInjector:
    addon = CredentialInjector(SecretStore(env))
    await addon.configure(Policy(providers=tuple(providers)))  # type: ignore[arg-type]
    return addon


CALLER_HEADERS = [
    ("Authorization", f"Bearer {PLACEHOLDER}"),
    ("x-api-key", PLACEHOLDER),
    ("api-key", PLACEHOLDER),
    ("Proxy-Authorization", "Basic cGxhY2Vob2xkZXI="),
    ("Content-Type", "application/json"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("auth", "expect_header", "expect_value"),
    [
        (Auth("bearer", SecretRef("env", "K")), "authorization", f"Bearer {SECRET}"),
        (Auth("header", SecretRef("env", "K"), header="x-api-key"), "x-api-key", SECRET),
        (Auth("header", SecretRef("env", "K"), header="xc-token", prefix="Token "), "xc-token", f"Token {SECRET}"),
        (
            Auth("basic", SecretRef("env", "K"), username="svc"),
            "authorization",
            "Basic c3ZjOnNrLWxpdmUtUkVBTC0wMTIzNDU2Nzg5",
        ),
    ],
)
async def test_caller_credentials_replaced(auth: Auth, expect_header: str, expect_value: str) -> None:
    provider = make_provider(auth=auth)
    addon = await injector_with({"K": SECRET}, provider)
    flow = make_flow(provider, headers=CALLER_HEADERS)
    addon.request(flow)
    headers = flow.request.headers
    assert PLACEHOLDER not in json.dumps(list(headers.items()))  # gone before any attempt
    assert flow.response is None
    url = addon.inject(headers, "https://api.openai.com/v1/x", provider, provider.targets[0])  # per attempt
    assert url == "https://api.openai.com/v1/x"
    assert headers.getall(expect_header) == [expect_value]
    assert PLACEHOLDER not in json.dumps(list(headers.items()))
    assert "proxy-authorization" not in headers
    assert headers["content-type"] == "application/json"


@pytest.mark.asyncio
async def test_query_parameter_credential_replaces_the_callers() -> None:
    provider = make_provider(auth=Auth("query", SecretRef("env", "K"), param="key"))
    addon = await injector_with({"K": "a b&c"}, provider)
    flow = make_flow(provider, path=f"/v1/x?key={PLACEHOLDER}&q=1&keyring=2")
    addon.request(flow)
    assert flow.upstream_url == "https://api.openai.com/v1/x?q=1&keyring=2"
    assert flow.request.path == "/v1/x?q=1&keyring=2"
    assert flow.upstream_url is not None
    url = addon.inject(flow.request.headers, flow.upstream_url, provider, provider.targets[0])
    assert url == "https://api.openai.com/v1/x?q=1&keyring=2&key=a%20b%26c"


@pytest.mark.asyncio
async def test_each_member_of_a_key_pool_gets_its_own_key() -> None:
    pool = (Target("a", secret=SecretRef("env", "KA")), Target("b", secret=SecretRef("env", "KB")), Target("c"))
    provider = dataclasses.replace(make_provider(auth=Auth("bearer", SecretRef("env", "K"))), targets=pool)
    addon = await injector_with({"KA": "key-a", "KB": "key-b", "K": "key-default"}, provider)
    seen = []
    for target in pool:
        headers: CIMultiDict[str] = CIMultiDict()
        addon.inject(headers, "https://h/", provider, target)
        seen.append(headers["authorization"])
    assert seen == ["Bearer key-a", "Bearer key-b", "Bearer key-default"]
    # A member whose secret is missing is not usable; the provider is while one member is.
    addon = await injector_with({"KB": "key-b"}, provider)
    assert [addon.usable(provider, t) for t in pool] == [False, True, False]
    assert addon.secret_available(provider)
    flow = make_flow(provider)
    addon.request(flow)
    assert flow.response is None
    addon = await injector_with({}, provider)
    addon.request(flow := make_flow(provider))
    assert flow.response is not None and flow.response.status == 503


@pytest.mark.asyncio
async def test_members_own_keys_without_a_provider_default() -> None:
    pool = (Target("a", secret=SecretRef("env", "KA")), Target("b", secret=SecretRef("env", "KB")))
    provider = dataclasses.replace(make_provider(auth=Auth("bearer", None)), targets=pool)
    addon = await injector_with({"KA": "key-a"}, provider)
    headers: CIMultiDict[str] = CIMultiDict()
    addon.inject(headers, "https://h/", provider, pool[0])
    assert headers["authorization"] == "Bearer key-a"
    assert [addon.usable(provider, t) for t in pool] == [True, False]
    with pytest.raises(CredentialUnavailable):
        addon.inject(CIMultiDict(), "https://h/", provider, pool[1])
    # A member with no key at all (a Provider built around the loader) is not
    # served: the request must not go out with no credential.
    bare = dataclasses.replace(provider, targets=(Target("a"),))
    addon.request(flow := make_flow(bare))
    assert flow.response is not None and flow.response.status == 503
    with pytest.raises(CredentialUnavailable):
        addon.inject(CIMultiDict(), "https://h/", bare, bare.targets[0])


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://h/p", "https://h/p"),
        ("https://h/p?key=1", "https://h/p"),
        ("https://h/p?a=1&key=2&key=3&b", "https://h/p?a=1&b"),
        ("https://h/p?key", "https://h/p"),
    ],
)
def test_strip_query_param(url: str, expected: str) -> None:
    assert strip_query_param(url, "key") == expected


@pytest.mark.asyncio
async def test_missing_secret_answers_503_and_strips_anyway(caplog: pytest.LogCaptureFixture) -> None:
    provider = make_provider(auth=Auth("bearer", SecretRef("env", "MISSING_KEY")))
    with caplog.at_level(logging.WARNING):
        addon = await injector_with({}, provider)
    assert "env:MISSING_KEY" in caplog.text  # reported at start, by source
    flow = make_flow(provider, headers=CALLER_HEADERS)
    addon.request(flow)
    assert flow.response is not None and flow.response.status == 503
    body = json.loads(flow.response.body or b"")
    assert body["error"]["code"] == "credential_unavailable"
    assert body["error"]["provider"] == "openai"
    assert "authorization" not in flow.request.headers


@pytest.mark.asyncio
async def test_secret_with_newline_is_refused_not_injected(caplog: pytest.LogCaptureFixture) -> None:
    provider = make_provider(auth=Auth("bearer", SecretRef("env", "K")))
    with caplog.at_level(logging.DEBUG):
        addon = await injector_with({"K": "sk-a\r\nX-Evil: 1"}, provider)
    flow = make_flow(provider)
    addon.request(flow)
    assert flow.response is not None and flow.response.status == 503
    assert "sk-a" not in caplog.text


def test_file_secret_rotates_and_trims_newline(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(SECRET + "\n")
    ref = SecretRef("file", str(path))
    store = SecretStore({})
    store.watch([ref])
    assert store.refresh() == [ref]
    assert store.get(ref) == SECRET
    assert store.refresh() == []  # unchanged file: not re-read
    # Kubernetes swaps a symlink atomically; a new inode is what we see.
    new = tmp_path / "token.new"
    new.write_text("sk-rotated\n")
    os.replace(new, path)
    assert store.refresh() == [ref]
    assert store.get(ref) == "sk-rotated"
    path.unlink()
    store.refresh()
    assert store.get(ref) is None
    assert store.problem(ref) == "is missing"
    assert SECRET not in repr(store)


def test_provider_headers_set_only_when_absent() -> None:
    provider = make_provider(set_headers=[("anthropic-version", "2023-06-01"), ("x-b", "1")])
    flow = make_flow(provider, headers=[("Anthropic-Version", "2024-01-01")])
    member = UpstreamState(provider, provider.targets[0], "api.openai.com", 443)
    ProviderHeaders().upstream_attempt(flow, Attempt(member, provider, flow.request.headers, "https://x/", 1))
    assert flow.request.headers.getall("anthropic-version") == ["2024-01-01"]
    assert flow.request.headers["x-b"] == "1"


class Recorder:
    def __init__(self, name: str, log: list[str], *, answer: bool = False, fail: bool = False) -> None:
        self.name, self.log, self.answer, self.fail = name, log, answer, fail

    async def request(self, flow: Flow) -> None:
        self.log.append(f"{self.name}.request")
        if self.fail:
            raise RuntimeError(f"boom {SECRET}")
        if self.answer:
            flow.response = Response.make(200, b"{}")

    def response(self, flow: Flow) -> None:
        self.log.append(f"{self.name}.response")
        if self.fail:
            raise ValueError(SECRET)


@pytest.mark.asyncio
async def test_hooks_run_in_order_and_local_answer_stops_the_request_hook() -> None:
    log: list[str] = []
    manager = AddonManager([Recorder("a", log), Recorder("b", log, answer=True), Recorder("c", log)])
    flow = make_flow()
    await manager.decide("request", flow)
    await manager.observe("response", flow)
    assert log == ["a.request", "b.request", "a.response", "b.response", "c.response"]


@pytest.mark.asyncio
async def test_request_addon_failure_fails_closed_without_its_message(caplog: pytest.LogCaptureFixture) -> None:
    manager = AddonManager([Recorder("guard", [], fail=True)])
    with caplog.at_level(logging.DEBUG), pytest.raises(AddonFailed):
        await manager.decide("request", make_flow())
    assert "guard" in caplog.text and "RuntimeError" in caplog.text
    assert SECRET not in caplog.text


@pytest.mark.asyncio
async def test_observer_failure_is_logged_and_the_next_addon_runs(caplog: pytest.LogCaptureFixture) -> None:
    log: list[str] = []
    manager = AddonManager([Recorder("a", log, fail=True), Recorder("b", log)])
    with caplog.at_level(logging.DEBUG):
        await manager.observe("response", make_flow())
    assert log == ["a.response", "b.response"]
    assert SECRET not in caplog.text


def test_default_addons_order() -> None:
    assert [type(a) for a in default_addons()] == [
        Placeholders, CredentialInjector, AwsSigner, ProviderHeaders, UsageMeter, Cache, Limits, Metrics, HealthChecks,
        AccessLog,
    ]  # fmt: skip
    assert AccessLog not in [type(a) for a in default_addons(access_log=False)]


def test_load_addon_from_file(tmp_path: Path) -> None:
    path = tmp_path / "my_addon.py"
    path.write_text("class Tag:\n    def request(self, flow):\n        flow.metadata['tag'] = 1\naddons = [Tag()]\n")
    (addon,) = load_addons(str(path))
    flow = make_flow()
    addon.request(flow)  # type: ignore[attr-defined]
    assert flow.metadata == {"tag": 1}
    with pytest.raises(ImportError):
        load_addons("json")  # a module without an addons list
    assert len(load_addons("addons.provider_headers:ProviderHeaders")) == 1
