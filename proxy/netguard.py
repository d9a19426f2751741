"""Refuse cloud metadata addresses for tunnels and upstreams.

A caller that can make sidekey connect to 169.254.169.254 can read the node's
cloud credentials. We resolve a name once, check every address it resolves to
(so a DNS answer mixing a public and a metadata address is refused), and then
connect to the checked address, never resolving again (no rebinding window).
Addresses the policy names under ``network.allow`` are exempt.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from proxy.policy import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

BLOCKED_NETWORKS: tuple[IPNetwork, ...] = (
    # Link-local: AWS/GCP/Azure/OCI IMDS at .254, ECS task metadata at
    # 169.254.170.2; nothing legitimate behind a provider name lives here.
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fd00:ec2::254/128"),  # AWS IMDS over IPv6
    ipaddress.ip_network("fe80::/10"),  # IPv6 link-local
    ipaddress.ip_network("100.100.100.200/32"),  # Alibaba Cloud metadata
)


class BlockedAddressError(OSError):
    """Raised by the resolver; an OSError so aiohttp wraps it as a DNS error."""

    def __init__(self, host: str) -> None:
        super().__init__(f"{host} resolves to a blocked address")
        self.host = host


def is_blocked(address: str | IPAddress, allow: Iterable[IPNetwork] = ()) -> bool:
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:169.254.169.254 is the same host
    if any(ip in net for net in allow):
        return False
    return any(ip in net for net in BLOCKED_NETWORKS)


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def check_addresses(host: str, addresses: Iterable[str], allow: Iterable[IPNetwork]) -> None:
    allow = tuple(allow)
    for address in addresses:
        if is_blocked(address.split("%")[0], allow):  # strip an IPv6 zone id
            raise BlockedAddressError(host)


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that checks every resolved address before use."""

    def __init__(self, allow: tuple[IPNetwork, ...] = ()) -> None:
        self._inner = DefaultResolver()
        self.allow = allow

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        check_addresses(host, (r["host"] for r in results), self.allow)
        return results

    async def close(self) -> None:
        await self._inner.close()


async def resolve_checked(host: str, port: int, allow: tuple[IPNetwork, ...]) -> list[tuple[int, str]]:
    """Resolve for a raw tunnel: [(family, address)], every address checked."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    found: list[tuple[int, str]] = [(family, str(sockaddr[0])) for family, _t, _p, _c, sockaddr in infos]
    check_addresses(host, (addr for _f, addr in found), allow)
    return found
