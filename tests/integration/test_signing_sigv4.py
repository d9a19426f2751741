"""AWS SigV4 signing (``auth: {type: aws-sigv4}``) through a real sidekey, in
front of fake AWS services that verify every signature as AWS does
(``tests/fakes/bedrock.py``) and answer 403 when it does not hold.

The caller is boto3's bedrock-runtime client signing with a key of its own:
sidekey removes that signature and signs with the policy's key. Logs at
DEBUG, audit with bodies, metrics and the admin views are swept for the key.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.eventstream import EventStreamBuffer

from tests.fakes.bedrock import FakeBedrock
from tests.fakes.stores import MotoTLSServer
from tests.integration.conftest import curl
from tests.integration.polling import wait_for
from tests.integration.sidekey_process import SidekeyProcess

KEY_ID, SECRET, TOKEN = "AKIASIDEKEYREAL0001", "sigv4-REAL-SECRET-ACCESS-KEY-7x7x", "sigv4-REAL-SESSION-TOKEN-9y9y"
CHAIN_ID, CHAIN_SECRET = "AKIASIDEKEYCHAIN001", "sigv4-CHAIN-SECRET-ACCESS-KEY-3w3w"
CALLER_ID, CALLER_SECRET, CALLER_TOKEN = "AKIACALLERFAKE00001", "caller-fake-secret", "caller-fake-session-token"
EAST = "bedrock-runtime.us-east-1.amazonaws.com"
WEST = "bedrock-runtime.us-west-2.amazonaws.com"
MODEL = "anthropic.claude-3-haiku-20240307-v1:0"
PROMPT = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
ENV = {"SIGN_KEY_ID": KEY_ID, "SIGN_SECRET": SECRET}


@pytest.fixture
def east() -> Iterator[FakeBedrock]:
    with FakeBedrock({KEY_ID: SECRET}, tokens={KEY_ID: TOKEN}) as fake:
        yield fake


def provider(name: str, host: str, fake: FakeBedrock, region: str, *, retry: str = "{attempts: 1}",
             credentials: str = "{access_key_id: env:SIGN_KEY_ID, secret_access_key: env:SIGN_SECRET, "
                                "session_token: file:TOKEN_FILE}", extra: str = "") -> str:  # fmt: skip
    return f"""\
  {name}:
    hosts: [{host}]
    upstream: https://localhost:{fake.port}
    tls: {{ca_bundle: {fake.ca_pem_path}}}
    auth:
      type: aws-sigv4
      service: {fake.service}
      region: {region}
      credentials: {credentials}
    retry: {retry}
{extra}"""


def start(start_sidekey: Any, tmp_path: Path, providers: str, *, env: dict[str, str] | None = None,
          args: tuple[str, ...] = ()) -> SidekeyProcess:  # fmt: skip
    token = tmp_path / "session-token"
    token.write_text(TOKEN)
    policy = f"version: 1\nproviders:\n{providers}".replace("TOKEN_FILE", str(token))
    return start_sidekey(policy, env={**ENV, **(env or {})}, args=args)  # type: ignore[no-any-return]


def bedrock_client(proxy: SidekeyProcess, region: str = "us-east-1") -> Any:
    """boto3 as an app uses it, with a key of its own (sidekey replaces its signature)."""
    config = Config(proxies={"https": proxy.url}, retries={"max_attempts": 1, "mode": "standard"})
    return boto3.client("bedrock-runtime", region_name=region, aws_access_key_id=CALLER_ID,
                        aws_secret_access_key=CALLER_SECRET, aws_session_token=CALLER_TOKEN,
                        verify=str(proxy.ca_path), config=config)  # fmt: skip


def invoke(proxy: SidekeyProcess, region: str = "us-east-1") -> dict[str, Any]:
    client = bedrock_client(proxy, region)
    try:
        answer = client.invoke_model(modelId=MODEL, body=json.dumps(PROMPT), contentType="application/json")
        return json.loads(answer["body"].read())  # type: ignore[no-any-return]
    finally:
        client.close()


def test_signed_invoke_replaces_the_callers_signature(start_sidekey: object, east: FakeBedrock,
                                                      tmp_path: Path) -> None:  # fmt: skip
    proxy = start(start_sidekey, tmp_path, provider("bedrock", EAST, east, "us-east-1"))
    assert invoke(proxy)["content"][0]["text"] == "Hello"
    (seen,) = east.seen
    assert seen.problem is None, seen.problem
    assert f"Credential={KEY_ID}/" in seen.headers["authorization"]
    assert seen.headers["x-amz-security-token"] == TOKEN, "the caller's session token went upstream"
    assert seen.path == "/model/anthropic.claude-3-haiku-20240307-v1%3A0/invoke"
    assert not any(CALLER_ID in v or CALLER_TOKEN in v for v in seen.headers.values())


def test_a_retry_is_signed_again_with_a_new_date(start_sidekey: object, east: FakeBedrock, tmp_path: Path) -> None:
    retry = "{attempts: 2, backoff_base: 10ms, backoff_cap: 50ms, deadline: 20s}"
    proxy = start(start_sidekey, tmp_path, provider("bedrock", EAST, east, "us-east-1", retry=retry))
    east.fail_next = 1  # 503 with Retry-After: 1, so the retry is a second or more later
    assert invoke(proxy)["content"][0]["text"] == "Hello"
    first, second = east.seen
    assert first.problem is None and second.problem is None
    assert second.amz_date > first.amz_date, "the retry reused the first attempt's date"
    assert first.headers["authorization"] != second.headers["authorization"]


def test_failover_to_another_region_is_signed_for_its_host_and_region(start_sidekey: object, east: FakeBedrock,
                                                                      tmp_path: Path) -> None:  # fmt: skip
    with FakeBedrock({KEY_ID: SECRET}, region="us-west-2", tokens={KEY_ID: TOKEN}) as west:
        fallback = "    fallbacks:\n      - provider: bedrock-west\n"
        providers = provider("bedrock", EAST, east, "us-east-1", extra=fallback)
        providers += provider("bedrock-west", WEST, west, "us-west-2")
        proxy = start(start_sidekey, tmp_path, providers)
        east.fail_next = 10
        assert invoke(proxy)["content"][0]["text"] == "Hello"
        assert [s.problem for s in east.seen] == [None]
        (seen,) = west.seen
        assert seen.problem is None, seen.problem
        assert "/us-west-2/bedrock/aws4_request" in seen.headers["authorization"]
        assert seen.headers["host"] == f"localhost:{west.port}"


def test_a_health_check_is_signed_like_traffic(start_sidekey: object, east: FakeBedrock, tmp_path: Path) -> None:
    """The probe runs the per-attempt hooks (#15): a check of a SigV4 provider is signed
    (an unsigned one gets AWS's 403 and would mark a healthy member unhealthy)."""
    check = "    health_check: {path: /foundation-models, interval: 200ms, timeout: 10s, unhealthy_after: 1}\n"
    proxy = start(start_sidekey, tmp_path, provider("bedrock", EAST, east, "us-east-1", extra=check))

    def member() -> dict[str, Any]:
        providers = httpx.get(proxy.admin_url + "/providers", timeout=60, trust_env=False).json()["providers"]
        [state] = next(p for p in providers if p["name"] == "bedrock")["upstreams"]
        return state  # type: ignore[no-any-return]

    assert wait_for(lambda: len([s for s in east.seen if s.path == "/foundation-models"]) >= 2)
    checks = [s for s in east.seen if s.path == "/foundation-models"]
    assert [s.problem for s in checks] == [None] * len(checks)
    assert all(f"Credential={KEY_ID}/" in s.headers["authorization"] for s in checks)
    assert all(s.headers["x-amz-security-token"] == TOKEN for s in checks)
    state = member()
    assert state["last_checked"] is not None and state["healthy"] is True


def test_a_body_too_large_to_sign_is_refused_413(start_sidekey: object, east: FakeBedrock, tmp_path: Path) -> None:
    retry = "{attempts: 1, replay_max_bytes: 1024}"
    proxy = start(start_sidekey, tmp_path, provider("bedrock", EAST, east, "us-east-1", retry=retry))
    url = f"https://{EAST}/model/{MODEL}/invoke"
    big = "x" * 100_000  # over the limit: replay_max_bytes, or 64 KiB (what is read whole anyway) if more
    for framing in ([], ["-H", "Transfer-Encoding: chunked"]):  # a known length, then chunked (read up to the limit)
        result = curl(proxy, "-s", "-w", "\n%{http_code}", "-H", "content-type: application/json", *framing,
                      "--data-binary", big, url)  # fmt: skip
        body, _, status = result.stdout.rpartition("\n")
        assert status == "413", result.stdout
        assert json.loads(body)["error"]["code"] == "body_too_large_to_sign"
    assert east.seen == []
    # A chunked body within the limit is held, hashed and signed.
    result = curl(proxy, "-s", "-H", "Transfer-Encoding: chunked", "--data-binary", "y" * 900, url)
    assert json.loads(result.stdout)["content"][0]["text"] == "Hello", result.stdout
    (seen,) = east.seen
    assert seen.problem is None and seen.body_length == 900


def test_unsigned_payload_for_a_streamed_upload(start_sidekey: object, tmp_path: Path) -> None:
    with FakeBedrock({KEY_ID: SECRET}, service="s3", allow_unsigned=True) as s3:
        retry = "{attempts: 1, replay_max_bytes: 1024}"
        creds = "{access_key_id: env:SIGN_KEY_ID, secret_access_key: env:SIGN_SECRET}"
        policy = provider("objects", "objects.s3.test", s3, "us-east-1", retry=retry, credentials=creds)
        policy = policy.replace("      credentials:", "      unsigned_payload: true\n      credentials:")
        proxy = start(start_sidekey, tmp_path, policy)
        data = tmp_path / "upload.bin"
        data.write_bytes(b"z" * 200_000)
        result = curl(proxy, "-s", "-X", "PUT", "-T", str(data), "-H", "Transfer-Encoding: chunked",
                      "https://objects.s3.test/bucket/key.bin")  # fmt: skip
        assert json.loads(result.stdout) == {"received": 200_000}, result.stdout
        small = curl(proxy, "-s", "-X", "PUT", "--data-binary", "small", "https://objects.s3.test/bucket/small")
        assert json.loads(small.stdout) == {"received": 5}
        big, held = s3.seen
        assert big.problem is None and big.headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
        assert held.problem is None and held.headers["x-amz-content-sha256"] != "UNSIGNED-PAYLOAD", "held: hash signed"


def test_streaming_response_passes_through_frame_by_frame(start_sidekey: object, east: FakeBedrock,
                                                          tmp_path: Path) -> None:  # fmt: skip
    proxy = start(start_sidekey, tmp_path, provider("bedrock", EAST, east, "us-east-1"))
    trust = ssl.create_default_context(cafile=str(proxy.ca_path))
    url = f"https://{EAST}/model/{MODEL}/invoke-with-response-stream"
    frames = EventStreamBuffer()
    got: list[dict[str, Any]] = []
    with httpx.Client(proxy=proxy.url, verify=trust, trust_env=False, timeout=60) as http:
        with http.stream("POST", url, json=PROMPT, headers={"authorization": "AWS4-HMAC-SHA256 fake"}) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"] == "application/vnd.amazon.eventstream"
            for piece in resp.iter_raw():
                frames.add_data(piece)
                for message in frames:
                    got.append(json.loads(message.payload))
                    if len(got) == 1:
                        east.release_stream()  # the second frame exists only once the first was received
    assert [json.loads(base64.b64decode(g["bytes"])) for g in got] == [
        {"type": "content_block_delta", "delta": {"text": "Hel"}}, {"delta": {"text": "lo"}}
    ]  # fmt: skip
    assert east.seen[0].problem is None


def test_default_chain_key_and_the_secrets_sweep(start_sidekey: object, tmp_path: Path) -> None:
    with FakeBedrock({CHAIN_ID: CHAIN_SECRET}) as fake:
        audit = tmp_path / "audit.jsonl"
        env = {"AWS_ACCESS_KEY_ID": CHAIN_ID, "AWS_SECRET_ACCESS_KEY": CHAIN_SECRET, "AWS_CONFIG_FILE": "/dev/null",
               "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
        env.pop("AWS_SESSION_TOKEN", None)
        proxy = start(start_sidekey, tmp_path, provider("bedrock", EAST, fake, "us-east-1", credentials="default"),
                      env=env, args=("--audit", str(audit), "--audit-bodies"))  # fmt: skip
        assert invoke(proxy)["content"][0]["text"] == "Hello"
        fake.keys[CHAIN_ID] = "a-different-secret"  # the next signature cannot hold: 403 like AWS
        with pytest.raises(Exception, match="InvalidSignature|403|Forbidden"):
            invoke(proxy)
        assert [s.problem is None for s in fake.seen] == [True, False]
        views = httpx.get(proxy.admin_url + "/providers", timeout=60, trust_env=False).text
        metrics = httpx.get(proxy.admin_url + "/metrics", timeout=60, trust_env=False).text
        proxy.stop()
        swept = {"log": proxy.log(), "audit": audit.read_text(), "providers": views, "metrics": metrics}
        for where, text in swept.items():
            for secret in (CHAIN_SECRET, CALLER_SECRET, CALLER_TOKEN):
                assert secret not in text, f"a secret reached the {where}"


def test_source_keys_are_kept_out_of_logs_audit_and_admin(start_sidekey: object, east: FakeBedrock,
                                                         tmp_path: Path) -> None:  # fmt: skip
    audit = tmp_path / "audit.jsonl"
    proxy = start(start_sidekey, tmp_path, provider("bedrock", EAST, east, "us-east-1"),
                  args=("--audit", str(audit), "--audit-bodies"))  # fmt: skip
    assert invoke(proxy)["content"][0]["text"] == "Hello"
    views = httpx.get(proxy.admin_url + "/providers", timeout=60, trust_env=False)
    sources = {c["source"] for p in views.json()["providers"] if p["name"] == "bedrock" for c in p["credentials"]}
    assert sources == {"env:SIGN_KEY_ID", "env:SIGN_SECRET", f"file:{tmp_path / 'session-token'}"}
    metrics = httpx.get(proxy.admin_url + "/metrics", timeout=60, trust_env=False).text
    proxy.stop()
    swept = {"log": proxy.log(), "audit": audit.read_text(), "providers": views.text, "metrics": metrics}
    for where, text in swept.items():
        for secret in (SECRET, TOKEN, CALLER_SECRET, CALLER_TOKEN):
            assert secret not in text, f"a secret reached the {where}"


def test_a_key_from_secrets_manager_is_reread_once_after_a_403(start_sidekey: object, tmp_path: Path) -> None:
    """The key rotated in the store (read every hour): AWS refuses the old
    signature, sidekey re-reads the key once and signs again; the caller sees 200."""
    rotated = "sigv4-ROTATED-SECRET-ACCESS-KEY-5v5v"
    with MotoTLSServer() as moto, FakeBedrock({KEY_ID: SECRET}) as fake:
        sm = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=moto.url,
                          verify=str(moto.ca_pem_path), aws_access_key_id="x", aws_secret_access_key="x")  # fmt: skip
        try:
            sm.create_secret(Name="bedrock/key", SecretString=json.dumps({"id": KEY_ID, "secret": SECRET}))
            creds = '{access_key_id: "aws-sm:bedrock/key#id", secret_access_key: "aws-sm:bedrock/key#secret"}'
            stores = f'secret_stores:\n  aws_sm: {{region: us-east-1, endpoint_url: "{moto.url}", ' \
                     f"ca_bundle: {moto.ca_pem_path}, ttl: 1h}}\n"  # fmt: skip
            policy = provider("bedrock", EAST, fake, "us-east-1", credentials=creds)
            proxy = start_sidekey(f"version: 1\n{stores}providers:\n{policy}",  # type: ignore[operator]
                                  env={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"})  # fmt: skip
            assert invoke(proxy)["content"][0]["text"] == "Hello"
            sm.put_secret_value(SecretId="bedrock/key", SecretString=json.dumps({"id": KEY_ID, "secret": rotated}))
            fake.keys[KEY_ID] = rotated
            assert invoke(proxy)["content"][0]["text"] == "Hello"
            assert [s.problem for s in fake.seen] == [None, "signature mismatch", None]
            proxy.stop()
            assert SECRET not in proxy.log() and rotated not in proxy.log()
        finally:
            sm.close()
