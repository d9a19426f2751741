"""Metadata-address refusal: pure checks, and the aiohttp resolver on real DNS
(the system resolver for literal addresses and localhost)."""

from __future__ import annotations

import ipaddress

import pytest

from proxy.netguard import BlockedAddressError, Guard, GuardedResolver, is_blocked, resolve_checked


@pytest.mark.parametrize(
    ("address", "blocked"),
    [
        ("169.254.169.254", True),
        ("169.254.170.2", True),
        ("fd00:ec2::254", True),
        ("::ffff:169.254.169.254", True),
        ("fe80::1", True),
        ("100.100.100.200", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("8.8.8.8", False),
        ("::1", False),
    ],
)
def test_is_blocked(address: str, blocked: bool) -> None:
    assert is_blocked(address) is blocked


def test_policy_allow_list_exempts_named_addresses() -> None:
    allow = (ipaddress.ip_network("169.254.169.254/32"),)
    assert not is_blocked("169.254.169.254", allow)
    assert is_blocked("169.254.170.2", allow)


def test_one_bad_address_refuses_the_whole_answer() -> None:
    with pytest.raises(BlockedAddressError) as info:
        Guard().check("mixed.example", ["93.184.216.34", "169.254.169.254"], 443)
    assert info.value.host == "mixed.example"


@pytest.mark.asyncio
async def test_resolver_checks_every_address() -> None:
    resolver = GuardedResolver(Guard())
    try:
        ok = await resolver.resolve("127.0.0.1", 443)
        assert ok[0]["host"] == "127.0.0.1"
        with pytest.raises(BlockedAddressError):
            await resolver.resolve("169.254.169.254", 80)
    finally:
        await resolver.close()


@pytest.mark.asyncio
async def test_resolve_checked_for_tunnels() -> None:
    assert (await resolve_checked("127.0.0.1", 80, Guard()))[0][1] == "127.0.0.1"
    with pytest.raises(BlockedAddressError):
        await resolve_checked("169.254.169.254", 80, Guard())


@pytest.mark.parametrize(("address", "port", "blocked"), [
    ("127.0.0.1", 9090, True), ("::1", 9090, True), ("0.0.0.0", 9090, True), ("127.0.0.1", 9091, False),
    ("10.1.2.3", 9090, False),
])  # fmt: skip
def test_own_listeners_are_refused_on_loopback(address: str, port: int, blocked: bool) -> None:
    guard = Guard(self_ports=frozenset({8080, 9090}))
    if blocked:
        with pytest.raises(BlockedAddressError):
            guard.check("h", [address], port)
    else:
        guard.check("h", [address], port)
