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
from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class Guard:
    """What may not be connected to: metadata addresses (unless allowed), and
    sidekey's own listeners on loopback, so a caller cannot reach the admin
    API, or loop the proxy into itself, through a tunnel or passthrough."""

    allow: tuple[IPNetwork, ...] = ()
    self_ports: frozenset[int] = frozenset()

    def check(self, host: str, addresses: Iterable[str], port: int) -> None:
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])  # strip an IPv6 zone id
            if is_blocked(ip, self.allow):
                raise BlockedAddressError(host)
            if port in self.self_ports and (ip.is_loopback or ip.is_unspecified):
                raise BlockedAddressError(host)


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that checks every resolved address before use."""

    def __init__(self, guard: Guard) -> None:
        self._inner = DefaultResolver()
        self.guard = guard

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        self.guard.check(host, (r["host"] for r in results), port)
        return results

    async def close(self) -> None:
        await self._inner.close()


async def resolve_checked(host: str, port: int, guard: Guard) -> list[tuple[int, str]]:
    """Resolve for a raw tunnel: [(family, address)], every address checked."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    found: list[tuple[int, str]] = [(family, str(sockaddr[0])) for family, _t, _p, _c, sockaddr in infos]
    guard.check(host, (addr for _f, addr in found), port)
    return found
