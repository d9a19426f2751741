"""AWS SigV4 signing: the signature against AWS's published test vectors,
the policy fields (typed, line-numbered problems that never quote a value),
the signer's place at the end of ``upstream_attempt`` whatever the addon
order, and the request hook's handling of caller headers and bodies."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from multidict import CIMultiDict

from addons import default_addons, signing
from addons.credentials import CredentialInjector
from addons.signing import AwsSigner, strip_caller_signature
from proxy import responses
from proxy.attempt import Attempt
from proxy.balance import UpstreamState
from proxy.credentials.sigv4 import EMPTY_SHA256, AwsKey, payload_hash, sign
from proxy.flow import Flow
from proxy.hooks import AddonManager
from proxy.policy import Auth, Policy, RetryPolicy, SecretRef
from proxy.policy.credential_model import SigV4
from proxy.policy.load import PolicyError, parse_policy
from proxy.secrets import SecretStore
from proxy.testing import make_flow, make_provider

# AWS's Signature Version 4 test suite (aws-sig-v4-test-suite): its example key, time, region and service.
EXAMPLE = AwsKey("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
WHEN = datetime(2015, 8, 30, 12, 36, tzinfo=UTC)
SCOPE = "AKIDEXAMPLE/20150830/us-east-1/service/aws4_request"


@pytest.mark.parametrize(
    ("case", "method", "url", "content_type", "body", "signed", "signature"),
    [
        ("get-vanilla", "GET", "https://example.amazonaws.com/", None, None, "host;x-amz-date",
         "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
        ("get-vanilla-query-order-key-case", "GET", "https://example.amazonaws.com/?Param2=value2&Param1=value1",
         None, None, "host;x-amz-date", "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"),
        ("post-x-www-form-urlencoded", "POST", "https://example.amazonaws.com/", "application/x-www-form-urlencoded",
         b"Param1=value1", "content-type;host;x-amz-date",
         "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a"),
    ],
)  # fmt: skip
def test_signature_matches_aws_test_suite(case: str, method: str, url: str, content_type: str | None,
                                          body: bytes | None, signed: str, signature: str) -> None:  # fmt: skip
    headers = dict(sign(method, url, content_type, body, False, EXAMPLE, "service", "us-east-1", WHEN))
    assert headers["X-Amz-Date"] == "20150830T123600Z", case
    assert headers["Authorization"] == (
        f"AWS4-HMAC-SHA256 Credential={SCOPE}, SignedHeaders={signed}, Signature={signature}"
    ), case


def test_temporary_key_unsigned_payload_and_s3() -> None:
    temp = AwsKey("AKIDEXAMPLE", "secret", "session-token")
    headers = dict(sign("PUT", "https://b.s3.amazonaws.com/k", None, None, True, temp, "s3", "eu-west-1", WHEN))
    assert headers["X-Amz-Security-Token"] == "session-token"
    assert headers["X-Amz-Content-SHA256"] == "UNSIGNED-PAYLOAD"
    assert "SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token," in headers["Authorization"]
    s3 = dict(sign("PUT", "https://b.s3.amazonaws.com/k", None, b"abc", False, EXAMPLE, "s3", "eu-west-1", WHEN))
    assert s3["X-Amz-Content-SHA256"] == payload_hash(b"abc") != EMPTY_SHA256
    # Signed payload hash: a different body is a different signature; a later second is another date.
    one = dict(sign("POST", "https://h/", None, b"a", False, EXAMPLE, "bedrock", "us-east-1", WHEN))
    two = dict(sign("POST", "https://h/", None, b"b", False, EXAMPLE, "bedrock", "us-east-1", WHEN))
    later = dict(sign("POST", "https://h/", None, b"a", False, EXAMPLE, "bedrock", "us-east-1",
                      WHEN.replace(second=1)))  # fmt: skip
    assert len({one["Authorization"], two["Authorization"], later["Authorization"]}) == 3
    assert "X-Amz-Content-SHA256" not in one and "secret" not in repr(temp)


POLICY = """\
version: 1
providers:
  bedrock:
    hosts: [bedrock-runtime.us-east-1.amazonaws.com]
    auth:
      type: aws-sigv4
      service: bedrock
      region: us-east-1
      credentials: {access_key_id: env:AK, secret_access_key: "file:/run/sk", session_token: env:ST}
  chain:
    hosts: [chain.test]
    auth: {type: aws-sigv4, service: s3, region: eu-west-1, unsigned_payload: true}
"""


def test_policy_reads_typed_sigv4() -> None:
    bedrock, chain = parse_policy(POLICY).providers
    assert bedrock.auth == Auth("aws-sigv4", None, sigv4=SigV4(
        "bedrock", "us-east-1", SecretRef("env", "AK"), SecretRef("file", "/run/sk"), SecretRef("env", "ST")))  # fmt: skip
    assert chain.auth.sigv4 == SigV4("s3", "eu-west-1", unsigned_payload=True)
    assert chain.auth.sigv4.default_chain and chain.auth.sigv4.refs() == ()


@pytest.mark.parametrize(
    ("auth", "problems"),
    [
        ("{type: aws-sigv4, service: bedrock}", ["3: providers.p.auth.region: required for type aws-sigv4"]),
        ("{type: aws-sigv4, service: Bed-Rock, region: moon-1z, secret: env:X}", [
            "3: providers.p.auth.secret: does not apply to type aws-sigv4",
            "3: providers.p.auth.service: expected an AWS signing name such as bedrock or s3",
            "3: providers.p.auth.region: expected an AWS region such as us-east-1"]),
        ("{type: aws-sigv4, service: s3, region: us-east-1, credentials: AKIAI44QH8DHBEXAMPLE}", [
            "3: providers.p.auth.credentials: expected default (the AWS chain) or {access_key_id, "
            "secret_access_key, session_token}; literal secrets are not allowed"]),
        ("{type: aws-sigv4, service: s3, region: us-east-1, credentials: {secret_access_key: je7MtGbClwBF}}", [
            "3: providers.p.auth.credentials.access_key_id: required unless credentials is default",
            "3: providers.p.auth.credentials.secret_access_key: expected env:NAME or file:PATH; "
            "literal secrets are not allowed"]),
    ],
)  # fmt: skip
def test_policy_problems_name_line_and_field_never_the_value(auth: str, problems: list[str]) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(f"version: 1\nproviders:\n  p: {{hosts: [p.test], auth: {auth}}}\n")
    got = [f"{p.line}: {p.field}: {p.message}" for p in caught.value.problems]
    assert got == problems
    for value in ("AKIAI44QH8DHBEXAMPLE", "je7MtGbClwBF", "moon-1z", "Bed-Rock"):
        assert all(value not in line for line in got)


class Recorder:
    def __init__(self, name: str, seen: list[str]) -> None:
        self.name, self.seen = name, seen

    def upstream_attempt(self, flow: Flow, attempt: Attempt) -> None:
        self.seen.append(self.name)


def test_the_signer_runs_last_in_upstream_attempt_whatever_the_order() -> None:
    signer = AwsSigner()
    manager = AddonManager([*default_addons(), Recorder("operator-addon", [])])
    # Every registered call (called() leaves out the idle ones: the signer is idle until a policy signs).
    assert manager._all["upstream_attempt"][-1][0] == "signing", "an operator's addon must not run after signing"
    seen: list[str] = []
    manager = AddonManager([Recorder("a", seen), signer, Recorder("b", seen)])
    manager.add(Recorder("c", seen))
    assert [name for name, _m, _a in manager._all["upstream_attempt"]] == ["a", "b", "c", "signing"]
    other = AwsSigner()
    other.name = "second-signer"
    with pytest.raises(TypeError, match="both ask to run last"):
        manager.add(other)


def test_idle_without_sigv4_providers() -> None:
    signer = AwsSigner()
    manager = AddonManager([signer])
    asyncio.run(manager.configure(Policy(providers=(make_provider(),))))
    assert manager.called("upstream_attempt") == [] and manager.called("request") == []
    sigv4 = make_provider("bedrock", auth=Auth("aws-sigv4", None, sigv4=SigV4("bedrock", "us-east-1")))
    manager.addons.clear()
    signer._chain = object()  # no chain lookup in a unit test
    asyncio.run(manager.configure(Policy(providers=(sigv4,))))
    assert manager.called("upstream_attempt") == ["signing"] and manager.called("request") == ["signing"]


def test_caller_signature_headers_are_stripped_bedrock_options_kept() -> None:
    headers = CIMultiDict([("Authorization", "AWS4-HMAC-SHA256 fake"), ("X-Amz-Date", "1"),
                           ("x-amz-security-token", "t"), ("X-Amz-Content-SHA256", "h"),
                           ("X-Amzn-Bedrock-Trace", "ENABLED"), ("content-type", "application/json")])  # fmt: skip
    strip_caller_signature(headers)
    assert sorted(headers) == ["X-Amzn-Bedrock-Trace", "content-type"]


class FixedKey:
    """The credentials addon's lookup, as the signer sees it."""

    def __init__(self, values: dict[SecretRef, str]) -> None:
        self.values = values

    def reference_value(self, ref: SecretRef) -> str | None:
        return self.values.get(ref)

    async def ensure(self, refs: list[SecretRef]) -> None:
        return None


async def _pieces(*pieces: bytes) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


def _sigv4_flow(limit: int, *, unsigned: bool = False) -> tuple[Flow, AwsSigner]:
    spec = SigV4("bedrock", "us-east-1", SecretRef("env", "AK"), SecretRef("env", "SK"), unsigned_payload=unsigned)
    provider = make_provider("bedrock", ("b.test",), auth=Auth("aws-sigv4", None, sigv4=spec))
    from dataclasses import replace

    provider = replace(provider, retry=RetryPolicy(replay_max_bytes=limit))
    flow = make_flow(provider, headers=[("X-Amz-Date", "caller"), ("content-type", "application/json")])
    signer = AwsSigner(FixedKey({SecretRef("env", "AK"): "AKIDEXAMPLE", SecretRef("env", "SK"): "sk"}))  # type: ignore[arg-type]
    return flow, signer


def _attempt(flow: Flow) -> Attempt:
    assert flow.provider is not None
    member = UpstreamState(flow.provider, flow.provider.targets[0], "b.test", 443)
    return Attempt(member, flow.provider, flow.request.headers, "https://b.test/model/m/invoke", 1, flow.request.body)


def test_a_chunked_body_is_held_and_signed_or_refused_over_the_limit() -> None:
    assert signing.SMALL_BODY == responses.SMALL_BODY, "held like a Content-Length body the session reads whole"
    flow, signer = _sigv4_flow(70_000)
    flow.request.body, flow.request.content_length = _pieces(b"a" * 40_000, b"b" * 20_000), None
    pending = signer.request(flow)
    assert pending is not None
    asyncio.run(pending)  # type: ignore[arg-type]
    held: object = flow.request.body
    assert flow.response is None and held == b"a" * 40_000 + b"b" * 20_000
    assert "X-Amz-Date" not in flow.request.headers, "the caller's date was kept"
    assert signer.upstream_attempt(flow, _attempt(flow)) is None
    assert flow.request.headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    over, signer = _sigv4_flow(70_000)
    over.request.body, over.request.content_length = _pieces(b"a" * 40_000, b"b" * 40_000), None
    asyncio.run(signer.request(over))  # type: ignore[arg-type]
    assert over.response is not None and over.response.status == 413
    assert b"body_too_large_to_sign" in (over.response.body or b"")
    known, signer = _sigv4_flow(70_000)
    known.request.body, known.request.content_length = _pieces(b"x"), 80_000
    assert signer.request(known) is None and known.response is not None and known.response.status == 413
    streamed, signer = _sigv4_flow(70_000, unsigned=True)
    streamed.request.body, streamed.request.content_length = _pieces(b"x"), 80_000
    assert signer.request(streamed) is None and streamed.response is None
    signer.upstream_attempt(streamed, _attempt(streamed))
    assert streamed.request.headers["X-Amz-Content-SHA256"] == "UNSIGNED-PAYLOAD"


def test_the_cache_names_a_signed_providers_answers_by_its_key_id() -> None:
    spec = SigV4("bedrock", "us-east-1", SecretRef("env", "AK"), SecretRef("env", "SK"))
    provider = make_provider("bedrock", ("b.test",), auth=Auth("aws-sigv4", None, sigv4=spec))
    digests = []
    for key_id in ("AKIDONE", "AKIDTWO"):
        store = SecretStore({"AK": key_id, "SK": "secret"})
        store.watch([SecretRef("env", "AK"), SecretRef("env", "SK")])
        store.refresh()
        injector = CredentialInjector(store)
        assert injector.usable(provider, provider.targets[0]), "signed, not injected: nothing is missing"
        digests.append(injector.credential_digest(provider, provider.targets[0], b"k"))
    assert None not in digests and digests[0] != digests[1]
    assert all("AKID" not in d and "secret" not in d for d in digests if d)


def test_the_signed_hash_is_of_the_attempts_body() -> None:
    """An earlier hook may give the attempt its own body (placeholder values put
    in, addons/placeholders.py): the hash signed is of the bytes sent."""
    from dataclasses import replace

    flow, signer = _sigv4_flow(70_000)
    assert flow.provider is not None and flow.provider.auth.sigv4 is not None
    s3 = replace(flow.provider.auth, sigv4=replace(flow.provider.auth.sigv4, service="s3"))  # s3 sends the hash
    flow.provider = replace(flow.provider, auth=s3)
    flow.request.body = b'{"k":"SIDEKEY_BEDROCK_NAME_1"}'
    attempt = _attempt(flow)
    attempt.body = b'{"k":"the-value"}'
    assert signer.upstream_attempt(flow, attempt) is None
    assert attempt.headers["X-Amz-Content-SHA256"] == hashlib.sha256(b'{"k":"the-value"}').hexdigest()
