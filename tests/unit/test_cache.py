"""The cache's pure parts: key, caller directives, storability, stream judging,
the memory store's byte bound, single flight, and the policy block."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from addons.cache import rules
from addons.cache.flight import Flight, FlightFailed
from addons.cache.key import cache_key, canonical_json
from addons.cache.sse import StreamJudge
from addons.cache.stores import Entry, MemoryStore
from addons.credentials import CredentialInjector
from proxy.policy import CachePolicy
from proxy.policy.load import PolicyError, parse_policy
from proxy.secrets import SecretStore

VARY = ("accept", "anthropic-version")


def key(body: bytes = b"{}", *, provider: str = "openai", identity: str = "id1", target: str = "/v1/chat/completions",
        method: str = "POST", headers: dict[str, str] | None = None, caller: str | None = None) -> str:  # fmt: skip
    h = CIMultiDict({"content-type": "application/json", **(headers or {})})
    return cache_key(provider=provider, identity=identity, caller=caller, method=method, target=target, headers=h,
                     vary=VARY, body=body)  # fmt: skip


# -- key ------------------------------------------------------------------------------------
def test_reordered_json_keys_and_whitespace_share_a_key() -> None:
    a = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5}'
    b = b'{"temperature":0.5,"messages":[{"content":"hi","role":"user"}],"model":"gpt-4o"}'
    assert key(a) == key(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (b'{"temperature": 0.5}', b'{"temperature": 0.7}'),
        (b'{"tools": []}', b'{"tools": [{"type": "function"}]}'),
        (b'{"n": 1}', b'{"n": 1.0}'),  # numbers as parsed: an int is not a float
        (b'{"n": 1}', b'{"n": true}'),
        (b'{"a": 1, "a": 2}', b'{"a": 2}'),  # duplicate keys: byte-exact
        (b"not json", b"not  json"),
    ],
)
def test_answer_changing_bodies_never_share(a: bytes, b: bytes) -> None:
    assert key(a) != key(b)


def test_every_part_is_in_the_key() -> None:
    base = key()
    assert key(identity="id2") != base  # another key or tenant
    assert key(provider="anthropic") != base
    assert key(method="PUT") != base
    assert key(target="/v1/embeddings") != base
    assert key(caller="alice") != base and key(caller="alice") != key(caller="bob")
    assert key(headers={"anthropic-version": "2023-06-01"}) != base
    assert key(headers={"accept": ""}) != base  # present but empty is not absent
    assert key(headers={"x-request-id": "1"}) == base  # not listed: does not change the answer
    assert key(target="/v1/models?b=2&a=1", method="GET") == key(target="/v1/models?a=1&b=2", method="GET")


def test_identity_is_a_keyed_hash_never_the_secret() -> None:
    secret = "sk-live-0123456789"
    policy = parse_policy(POLICY % "      ttl: 1m\n")
    creds = CredentialInjector(SecretStore({"OPENAI_API_KEY": secret}))
    asyncio.run(creds.configure(policy))
    provider = policy.providers[0]
    digest = creds.credential_digest(provider, provider.targets[0], b"k" * 32)
    assert digest is not None and secret not in digest and len(digest) == 64
    assert digest == creds.credential_digest(provider, provider.targets[0], b"k" * 32)
    assert digest != creds.credential_digest(provider, provider.targets[0], b"j" * 32)
    other = CredentialInjector(SecretStore({"OPENAI_API_KEY": secret + "x"}))
    asyncio.run(other.configure(policy))
    assert other.credential_digest(provider, provider.targets[0], b"k" * 32) != digest


def test_canonical_json_rejects_nan_and_duplicates() -> None:
    assert canonical_json(b'{"a": NaN}') is None
    assert canonical_json(b'{"a": 1, "a": 1}') is None
    assert canonical_json(b'{"b": 1e2, "a": "\\u00e9"}') == '{"a":"é","b":100.0}'.encode()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def typed(value: Any) -> Any:
    """Equality that keeps JSON's types apart (Python has 1 == 1.0 == True)."""
    if isinstance(value, dict):
        return ("o", tuple(sorted((k, typed(v)) for k, v in value.items())))
    if isinstance(value, list):
        return ("a", tuple(typed(v) for v in value))
    return (type(value).__name__, repr(value) if isinstance(value, float) else value)  # -0.0 is not 0.0


def render(value: Any, style: int) -> bytes:
    """The same value written another way: key order, spacing, escapes."""
    if style == 0:
        return json.dumps(value).encode()
    if style == 1:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return json.dumps(_reversed(value), indent=2, ensure_ascii=True).encode()


def _reversed(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _reversed(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reversed(v) for v in value]
    return value


@settings(max_examples=300, deadline=None)
@given(a=json_values, b=json_values, style_a=st.integers(0, 2), style_b=st.integers(0, 2), same=st.booleans(),
       query=st.permutations(["a=1", "b=2", "c=3"]))  # fmt: skip
def test_equal_keys_iff_canonically_equal(a: Any, b: Any, style_a: int, style_b: int, same: bool,
                                          query: list[str]) -> None:  # fmt: skip
    if same:
        b = json.loads(json.dumps(a))
    target_a = "/v1/x?a=1&b=2&c=3"
    target_b = "/v1/x?" + "&".join(query)
    equal_keys = key(render(a, style_a), target=target_a) == key(render(b, style_b), target=target_b)
    assert equal_keys == (typed(a) == typed(b))


# -- caller directives and storability --------------------------------------------------------
def test_caller_headers_are_read_and_removed() -> None:
    policy = CachePolicy(ttl=300)
    h = CIMultiDict({"x-sidekey-cache": "no-store", "x-sidekey-cache-ttl": "60", "cache-control": "max-age=30",
                     "accept": "application/json"})  # fmt: skip
    d = rules.directives(h, policy)
    assert (d.lookup, d.store, d.ttl) == (False, False, 30.0)
    assert list(h) == ["accept"]
    assert rules.directives(CIMultiDict({"x-sidekey-cache": "no-cache"}), policy) == rules.Directives(False, True, 300)
    assert rules.directives(CIMultiDict({"cache-control": "no-cache"}), policy).lookup is False
    assert rules.directives(CIMultiDict({"x-sidekey-cache-ttl": "9999"}), policy).ttl == 300  # lower only
    assert rules.directives(CIMultiDict({"x-sidekey-cache-ttl": "x"}), policy).ttl == 300


@pytest.mark.parametrize(
    ("status", "headers", "ok"),
    [
        (200, {}, True),
        (201, {}, False),
        (500, {}, False),
        (200, {"set-cookie": "a=b"}, False),
        (200, {"cache-control": "no-store"}, False),
        (200, {"cache-control": "private, max-age=60"}, False),
        (200, {"cache-control": "max-age=60"}, True),
        (200, {"vary": "*"}, False),
    ],
)
def test_storable_head(status: int, headers: dict[str, str], ok: bool) -> None:
    assert rules.storable_head(status, CIMultiDict(headers), CachePolicy()) is ok


# -- streams -------------------------------------------------------------------------------------
OPENAI = b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\ndata: [DONE]\n\n'
ANTHROPIC = (
    b'event: message_start\ndata: {"type":"message_start"}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'
)


@pytest.mark.parametrize("stream", [OPENAI, ANTHROPIC, OPENAI.replace(b"\n", b"\r\n")])
@pytest.mark.parametrize("split", [1, 3, 7, 1000])
def test_a_finished_stream_is_clean_in_any_split(stream: bytes, split: int) -> None:
    judge = StreamJudge()
    for i in range(0, len(stream), split):
        judge.feed(stream[i : i + split])
    assert judge.clean


@pytest.mark.parametrize(
    "stream",
    [
        OPENAI[: OPENAI.index(b"data: [DONE]")],  # cut before the end
        b"event: error\ndata: {}\n\n" + OPENAI,
        b'data: {"error":{"message":"overloaded"}}\n\n' + OPENAI,
        OPENAI + b"data: more\n\n",
    ],
)
def test_cut_or_failed_streams_are_not_clean(stream: bytes) -> None:
    judge = StreamJudge()
    judge.feed(stream)
    assert not judge.clean


# -- memory store ----------------------------------------------------------------------------------
def entry(size: int, path: str = "/v1/chat/completions", provider: str = "openai", at: float = 0.0) -> Entry:
    return Entry(provider, path, 200, (), b"x" * size, at, 10.0, 5.0)


def test_memory_store_stays_under_its_bound_while_filled_ten_times() -> None:
    now = [0.0]
    store = MemoryStore(100 * entry(1000).size, clock=lambda: now[0])
    for i in range(1000):
        store.put(f"k{i}", entry(1000))
        assert store.bytes <= store.max_bytes
    assert len(store.entries) == 100 and store.evictions == 900
    assert store.get("k999") is not None and store.get("k0") is None


def test_memory_store_is_lru_and_expires_after_the_stale_window() -> None:
    now = [0.0]
    store = MemoryStore(2 * entry(10).size, clock=lambda: now[0])
    store.put("a", entry(10))
    store.put("b", entry(10))
    assert store.get("a") is not None  # a is now the most recent
    store.put("c", entry(10))
    assert store.get("b") is None and store.get("a") is not None
    now[0] = 14.9
    assert store.get("a") is not None and not store.get("a").fresh(now[0])  # type: ignore[union-attr]
    now[0] = 15.0
    assert store.get("a") is None


def test_delete_by_provider_and_path_glob() -> None:
    store = MemoryStore(10**6)
    store.put("1", entry(1, "/v1/chat/completions"))
    store.put("2", entry(1, "/v1/embeddings"))
    store.put("3", entry(1, "/v1/messages", provider="anthropic"))
    assert store.delete("openai", "/v1/chat/*") == 1
    assert store.delete(None, "*") == 2 and store.bytes == 0


def test_entries_round_trip_and_foreign_values_are_refused() -> None:
    e = Entry("openai", "/p", 200, (("content-type", "text/event-stream"),), b"data: x\n\n\xff", 1.5, 10, 2, 0.25, 9)
    assert Entry.decode(e.encode()) == e
    assert Entry.decode(b"\x80\x04pickle") is None and Entry.decode(b'{"provider": 1}\n') is None


# -- single flight ------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_late_followers_get_everything_and_slow_ones_are_cut() -> None:
    flight = Flight("k", window=10)
    flight.head(200, CIMultiDict())
    flight.publish(b"abc")
    early = flight.follow()
    assert await early.__anext__() == b"abc"
    flight.publish(b"def")
    late = [p async for p in _take(flight.follow(), 2)]
    assert late == [b"abc", b"def"]  # the pieces so far
    flight.publish(b"0123456789")  # 16 bytes: past the window, the first pieces go
    assert not flight.open
    with pytest.raises(FlightFailed):
        await early.__anext__()  # 13 bytes behind a 10-byte window
    fresh = flight.follow()
    with pytest.raises(FlightFailed):
        await fresh.__anext__()  # the start is gone: cut, not skipped ahead


@pytest.mark.asyncio
async def test_a_failed_flight_tells_waiting_followers() -> None:
    flight = Flight("k", window=100)
    waiter = asyncio.create_task(flight.wait_start())
    await asyncio.sleep(0)
    flight.fail()
    assert await waiter is False
    done = Flight("k", window=100)
    done.head(200, CIMultiDict())
    done.publish(b"{}")
    done.finish()
    assert await done.wait_start() and done.body() == b"{}"


async def _take(it: Any, n: int) -> Any:
    for _ in range(n):
        yield await it.__anext__()


# -- policy ---------------------------------------------------------------------------------------------
POLICY = """version: 1
providers:
  openai:
    hosts: [api.openai.com]
    auth: {type: bearer, secret: env:OPENAI_API_KEY}
    cache:
%s
"""


def test_cache_block_is_parsed() -> None:
    block = "      ttl: 2m\n      max_bytes: 8MiB\n      max_entry_bytes: 64KiB\n      stale_if_error: 1h\n" \
            "      coalesce: false\n      scope: caller\n      paths: [/v1/chat/completions]\n"  # fmt: skip
    c = parse_policy(POLICY % block).providers[0].cache
    assert c == CachePolicy(ttl=120, paths=("/v1/chat/completions",), max_entry_bytes=65536, max_bytes=8 * 2**20,
                            stale_if_error=3600, coalesce=False, scope="caller")  # fmt: skip
    assert parse_policy(POLICY % "      ttl: 1m\n").providers[0].cache is not None
    counted = parse_policy(POLICY % "      count_hits: caller\n").providers[0].cache
    assert counted is not None and counted.count_hits == "caller" and counted.coalesce_cluster is False
    clustered = parse_policy(
        "redis: {url: 'redis://127.0.0.1:1'}\n" + POLICY % "      backend: redis\n      coalesce: cluster\n"
    )
    assert clustered.providers[0].cache == CachePolicy(backend="redis", coalesce=True, coalesce_cluster=True)
    assert parse_policy(POLICY.replace("    cache:\n%s", "")).providers[0].cache is None


def test_cache_block_errors_name_the_line_and_never_the_value() -> None:
    block = "      ttl: sk-secret-1\n      backend: redis\n      scope: everyone\n      count_hits: sk-2\n"
    with pytest.raises(PolicyError) as info:
        parse_policy(POLICY % block)
    text = str(info.value)
    assert "<memory>:10: providers.openai.cache.count_hits: expected one of: none, caller" in text
    with pytest.raises(PolicyError) as local:
        parse_policy(POLICY % "      coalesce: cluster\n")
    assert "<memory>:7: providers.openai.cache.coalesce: cluster needs backend: redis" in str(local.value)
    assert "<memory>:7: providers.openai.cache.ttl: expected a duration" in text
    assert "providers.openai.cache.backend: redis needs the policy's redis: section" in text
    assert "<memory>:9: providers.openai.cache.scope" in text
    assert "sk-secret-1" not in text and "everyone" not in text and "sk-2" not in text
