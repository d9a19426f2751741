"""Placeholders anywhere in the request: the pure core (``proxy.placeholders``),
the policy reader, and the addon's two hooks through ``make_flow``."""

from __future__ import annotations

import dataclasses
import json
import logging
from urllib.parse import parse_qsl

import pytest
from multidict import CIMultiDict

from addons.credentials import CredentialInjector
from addons.placeholders import Placeholders
from proxy import placeholders as ph
from proxy.attempt import Attempt
from proxy.balance import UpstreamState
from proxy.capabilities import SECRETS, Capability
from proxy.errors import CredentialUnavailable, PlaceholderMisdirected
from proxy.policy import Auth, Policy, Provider, SecretRef
from proxy.policy.load import PolicyError, parse_policy
from proxy.secrets import SecretStore
from proxy.testing import make_flow, make_provider

HOOK = "SIDEKEY_SLACK_WEBHOOK_TOKEN"
OTHER = "SIDEKEY_GITHUB_TOKEN_XYZ"
HOOK_VALUE = "T0001/B0002/xoxSECRETwebhook"
OWNERS = {HOOK: "slack", OTHER: "github"}


# -- the core ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "found"),
    [
        (f"/services/{HOOK}", [HOOK]),
        (f"Bearer {HOOK}", [HOOK]),
        (f'{{"a":"{HOOK}","b":"x {OTHER} y"}}', [HOOK, OTHER]),
        (f"x{HOOK}", []),  # not a whole token
        (f"{HOOK}_V2", []),  # a longer name: another string
        (f"{HOOK}abc", []),
        ("SIDEKEY_UNKNOWN_NAME_HERE", []),  # the shape, but no policy names it
        ("SIDEKEY_SHORT", []),
        ("nothing to see", []),
        (f"{HOOK}/{HOOK}", [HOOK, HOOK]),
    ],
)
def test_names_are_whole_tokens_the_policy_knows(text: str, found: list[str]) -> None:
    assert ph.names_in(text, OWNERS) == found
    assert ph.names_in_bytes(text.encode(), OWNERS) == found


@pytest.mark.parametrize(
    ("name", "ok"),
    [(HOOK, True), ("SIDEKEY_ABCDEFGH", True), ("SIDEKEY_ABCDEFG", False), ("sidekey_abcdefgh", False),
     ("SIDEKEY_" + "A" * 64, True), ("SIDEKEY_" + "A" * 65, False), ("OTHER_ABCDEFGHIJ", False),
     ("SIDEKEY_ABC-DEFGH", False)],
)  # fmt: skip
def test_name_rule(name: str, ok: bool) -> None:
    assert bool(ph.NAME.fullmatch(name)) is ok


def test_misdirected_names_the_first_foreign_one() -> None:
    assert ph.misdirected([HOOK, HOOK], OWNERS, "slack") is None
    assert ph.misdirected([HOOK, OTHER], OWNERS, "slack") == OTHER
    assert ph.misdirected([HOOK], OWNERS, None) == HOOK


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"https://hooks.slack.test/services/{HOOK}", "https://hooks.slack.test/services/T0001/B0002/a%20b%3Fc%23d"),
        (f"https://h:8443/x?token={HOOK}&q=1", "https://h:8443/x?token=T0001%2FB0002%2Fa%20b%3Fc%23d&q=1"),
        (f"https://h/{HOOK}?k={HOOK}", "https://h/T0001/B0002/a%20b%3Fc%23d?k=T0001%2FB0002%2Fa%20b%3Fc%23d"),
        ("https://h/v1/x?a=SIDEKEY_NOT_KNOWN_1", "https://h/v1/x?a=SIDEKEY_NOT_KNOWN_1"),
        (f"https://h?k={HOOK}", "https://h?k=T0001%2FB0002%2Fa%20b%3Fc%23d"),
    ],
)
def test_url_values_are_encoded_for_where_they_stand(url: str, expected: str) -> None:
    assert ph.in_url(url, {HOOK: "T0001/B0002/a b?c#d"}) == expected


def test_header_value_with_a_line_break_is_refused() -> None:
    assert ph.in_header(f"Bearer {HOOK}", {HOOK: "v"}) == "Bearer v"
    with pytest.raises(ph.BadValue) as info:
        ph.in_header(f"Bearer {HOOK}", {HOOK: "v\r\nX-Evil: 1"})
    assert "Evil" not in str(info.value)


def test_json_values_are_escaped_and_keys_left() -> None:
    value = 'quote" back\\slash \u00e9 </script>'
    body = json.dumps({"text": f"token {HOOK}", HOOK: 1, "n": [HOOK, 2, None], "other": "SIDEKEY_NOT_KNOWN_1"})
    out = ph.in_body(body.encode(), "application/json; charset=utf-8", {HOOK: value})
    assert json.loads(out) == {"text": f"token {value}", HOOK: 1, "n": [value, 2, None], "other": "SIDEKEY_NOT_KNOWN_1"}
    assert ph.in_json(b"not json " + HOOK.encode(), {HOOK: value}) == b"not json " + HOOK.encode()
    plain = b'{"a": "SIDEKEY_NOT_KNOWN_1"}'
    assert ph.in_json(plain, {HOOK: value}) is plain  # nothing put in: the bytes as they came


def test_form_fields_are_substituted_one_by_one() -> None:
    body = f"client_id=app&client_secret={HOOK}&note=a%2Bb+c&raw=%7E".encode()
    out = ph.in_body(body, "application/x-www-form-urlencoded", {HOOK: "s&cr=t +/"})
    assert dict(parse_qsl(out.decode())) == {"client_id": "app", "client_secret": "s&cr=t +/", "note": "a+b c",
                                             "raw": "~"}  # fmt: skip
    assert out.endswith(b"&note=a%2Bb+c&raw=%7E")  # the other fields byte for byte


@pytest.mark.parametrize(
    ("content_type", "ok"),
    [("application/json", True), ("Application/JSON; charset=utf-8", True), ("application/vnd.api+json", True),
     ("application/x-www-form-urlencoded", True), ("text/plain", False), (None, False),
     ("multipart/form-data; boundary=x", False)],
)  # fmt: skip
def test_substitutable_bodies(content_type: str | None, ok: bool) -> None:
    assert ph.substitutable(content_type) is ok


# -- the policy ------------------------------------------------------------------
BASE = "version: 1\nproviders:\n  slack:\n    hosts: [hooks.slack.test]\n    auth: {type: none}\n"


def test_policy_reads_placeholders_and_owners() -> None:
    policy = parse_policy(BASE + f"    placeholders:\n      {HOOK}: env:SLACK_HOOK\n      SIDEKEY_SLACK_OTHER_KEY: "
                          "file:/run/slack\n", "p.yaml")  # fmt: skip
    slack = policy.providers[0]
    assert slack.placeholders == ((HOOK, SecretRef("env", "SLACK_HOOK")),
                                  ("SIDEKEY_SLACK_OTHER_KEY", SecretRef("file", "/run/slack")))  # fmt: skip
    assert policy.placeholder_owners == {HOOK: "slack", "SIDEKEY_SLACK_OTHER_KEY": "slack"}
    assert parse_policy(BASE, "p.yaml").placeholder_owners == {}


@pytest.mark.parametrize(
    ("extra", "line", "field", "words"),
    [
        (
            "    placeholders:\n      slack_token: env:X\n",
            7,
            "providers.slack.placeholders.slack_token",
            "expected a placeholder name: SIDEKEY_",
        ),
        ("    placeholders:\n      SIDEKEY_SHORT: env:X\n", 7, "providers.slack.placeholders.SIDEKEY_SHORT", "8 to 64"),
        (
            f"    placeholders:\n      {HOOK}: xoxb-literal-SECRET\n",
            7,
            f"providers.slack.placeholders.{HOOK}",
            "literal secrets are not allowed",
        ),
        (
            f"    placeholders:\n      {HOOK}: vault:secret/data/x#k\n",
            7,
            f"providers.slack.placeholders.{HOOK}",
            "need secret_stores.vault",
        ),
        (
            f"    placeholders:\n      {HOOK}: env:A\n  other:\n    hosts: [o.test]\n    auth: {{type: none}}\n"
            f"    placeholders:\n      {HOOK}: env:B\n",
            12,
            f"providers.other.placeholders.{HOOK}",
            "already a placeholder of provider slack (line 7)",
        ),
        ("    placeholders: [a]\n", 6, "providers.slack.placeholders", "expected a mapping"),
    ],
)
def test_policy_problems_never_quote_a_value(extra: str, line: int, field: str, words: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(BASE + extra, "p.yaml")
    found = info.value.problems
    assert any(p.line == line and p.field == field and words in p.message for p in found), found
    assert all("literal-SECRET" not in p.message and "literal-SECRET" not in p.field for p in found)


# -- the addon ---------------------------------------------------------------------
class FakeRuntime:
    def __init__(self, secrets: object) -> None:
        self.secrets = secrets

    def capability(self, cap: Capability[object]) -> object:
        assert cap is SECRETS
        return self.secrets


def slack(*named: tuple[str, SecretRef]) -> Provider:
    return dataclasses.replace(make_provider("slack", ("hooks.slack.test",), auth=Auth("none", None)),
                               placeholders=named or ((HOOK, SecretRef("env", "SLACK_HOOK")),))  # fmt: skip


async def addon_for(policy: Policy, env: dict[str, str]) -> tuple[Placeholders, CredentialInjector]:
    creds = CredentialInjector(SecretStore(env))
    await creds.configure(policy)
    addon = Placeholders()
    addon.setup(FakeRuntime(creds))  # type: ignore[arg-type]
    addon.configure(policy)
    return addon, creds


def attempt_for(flow_provider: Provider, headers: CIMultiDict[str], url: str, body: bytes) -> Attempt:
    member = UpstreamState(flow_provider, flow_provider.targets[0], flow_provider.hosts[0], 443)
    return Attempt(member, flow_provider, headers, url, 1, body)


@pytest.mark.asyncio
async def test_values_go_on_the_attempt_and_never_on_the_flow() -> None:
    provider = slack()
    github = dataclasses.replace(make_provider("github", ("api.github.test",)),
                                 placeholders=((OTHER, SecretRef("env", "GH")),))  # fmt: skip
    policy = Policy(providers=(provider, github))
    addon, _creds = await addon_for(policy, {"SLACK_HOOK": HOOK_VALUE, "GH": "gh-SECRET", "OPENAI_API_KEY": "k"})
    body = json.dumps({"text": f"see {HOOK}"}).encode()
    flow = make_flow(provider, path=f"/services/{HOOK}?t={HOOK}", policy=policy, body=body,
                     headers=[("Authorization", f"Bearer {HOOK}"), ("content-type", "application/json")])  # fmt: skip
    addon.request(flow)
    assert flow.response is None
    assert flow.upstream_url is not None
    attempt = attempt_for(provider, flow.request.headers, flow.upstream_url, body)
    assert addon.upstream_attempt(flow, attempt) is None
    assert attempt.url == ("https://hooks.slack.test/services/T0001/B0002/xoxSECRETwebhook"
                           "?t=T0001%2FB0002%2FxoxSECRETwebhook")  # fmt: skip
    assert attempt.headers["authorization"] == f"Bearer {HOOK_VALUE}"
    assert json.loads(attempt.body) == {"text": f"see {HOOK_VALUE}"}  # type: ignore[arg-type]
    # The flow (what audit, dead letters and logs read) keeps the names.
    assert HOOK_VALUE not in repr((flow.request.path, list(flow.request.headers.items()), flow.request.body,
                                   flow.upstream_url, repr(addon._uses)))  # fmt: skip
    addon.response(flow)
    assert addon.statistics() == {"in_flight": 0, "refused": 0}


@pytest.mark.asyncio
@pytest.mark.parametrize("where", ["path", "query", "header", "body"])
async def test_a_foreign_name_is_refused_and_logged(where: str, caplog: pytest.LogCaptureFixture) -> None:
    provider, github = slack(), make_provider("github", ("api.github.test",))
    github = dataclasses.replace(github, placeholders=((OTHER, SecretRef("env", "GH")),))
    policy = Policy(providers=(provider, github))
    addon, _ = await addon_for(policy, {"SLACK_HOOK": HOOK_VALUE, "GH": "gh-SECRET", "OPENAI_API_KEY": "k"})
    path = {"path": f"/x/{HOOK}", "query": f"/x?q={HOOK}"}.get(where, "/x")
    headers = [("X-Thing", f"a {HOOK}")] if where == "header" else []
    body = json.dumps({"m": HOOK}).encode() if where == "body" else b""
    flow = make_flow(github, path=path, headers=headers, body=body, policy=policy)
    with caplog.at_level(logging.WARNING, "sidekey.security"):
        addon.request(flow)
    assert flow.response is not None and flow.response.status == 403
    assert json.loads(flow.response.body or b"")["error"]["code"] == "placeholder_misdirected"
    assert f"placeholder {HOOK} of provider slack sent to host api.github.test" in caplog.text
    assert HOOK_VALUE not in caplog.text and HOOK_VALUE not in (flow.response.body or b"").decode()
    assert addon.statistics()["refused"] == 1


@pytest.mark.asyncio
async def test_unmatched_host_and_lookalikes() -> None:
    provider = slack()
    policy = Policy(providers=(provider,))
    addon, _ = await addon_for(policy, {"SLACK_HOOK": HOOK_VALUE, "OPENAI_API_KEY": "k"})
    flow = make_flow(None, path=f"/a?b={HOOK}", policy=policy, host="example.test")  # plain http, unmatched
    addon.request(flow)
    assert flow.response is not None and flow.response.status == 403
    looks = make_flow(None, path="/a?b=SIDEKEY_LOOKS_LIKE_ONE&c=XSIDEKEY_SLACK_WEBHOOK_TOKEN", policy=policy,
                      host="example.test")  # fmt: skip
    addon.request(looks)
    assert looks.response is None and not addon._uses


@pytest.mark.asyncio
async def test_fallback_attempt_and_missing_value_are_refused() -> None:
    provider, other = slack(), make_provider("other", ("o.test",))
    policy = Policy(providers=(provider, other))
    addon, _ = await addon_for(policy, {"OPENAI_API_KEY": "k"})  # SLACK_HOOK missing
    flow = make_flow(provider, path=f"/services/{HOOK}", policy=policy)
    addon.request(flow)
    assert flow.upstream_url is not None
    with pytest.raises(CredentialUnavailable):
        addon.upstream_attempt(flow, attempt_for(provider, flow.request.headers, flow.upstream_url, b""))
    with pytest.raises(PlaceholderMisdirected):
        addon.upstream_attempt(flow, attempt_for(other, flow.request.headers, "https://o.test/services/x", b""))
    addon.error(flow)
    assert addon.statistics()["in_flight"] == 0


@pytest.mark.asyncio
async def test_header_value_with_line_break_answers_503() -> None:
    provider = slack()
    policy = Policy(providers=(provider,))
    addon, _ = await addon_for(policy, {"SLACK_HOOK": "a\nb", "OPENAI_API_KEY": "k"})
    flow = make_flow(provider, headers=[("X-Token", HOOK)], policy=policy)
    addon.request(flow)
    assert flow.upstream_url is not None
    with pytest.raises(CredentialUnavailable):
        addon.upstream_attempt(flow, attempt_for(provider, flow.request.headers, flow.upstream_url, b""))
