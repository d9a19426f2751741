"""Helpers for testing addons without sockets (shipped, so operators writing
their own addons can use them too)."""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDict

from proxy import routing
from proxy.flow import Flow, Request
from proxy.policy import Auth, Policy, Provider, SecretRef, Upstream


def make_provider(
    name: str = "openai",
    hosts: Iterable[str] = ("api.openai.com",),
    *,
    auth: Auth | None = None,
    upstream: Upstream | None = None,
    set_headers: Iterable[tuple[str, str]] = (),
) -> Provider:
    return Provider(
        name=name,
        hosts=tuple(hosts),
        upstream=upstream,
        auth=auth or Auth("bearer", SecretRef("env", "OPENAI_API_KEY")),
        set_headers=tuple(set_headers),
    )


def make_flow(
    provider: Provider | None = None,
    *,
    method: str = "POST",
    path: str = "/v1/chat/completions",
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    host: str | None = None,
    port: int = 443,
    policy: Policy | None = None,
) -> Flow:
    """A flow as the engine builds it after routing, before the request hook."""
    if provider is None and policy is None:
        provider = make_provider()
    if policy is None:
        policy = Policy(providers=(provider,) if provider else ())
    host = host or (provider.hosts[0] if provider else "example.com")
    request = Request(method, path, CIMultiDict(headers), host, port, body=body, content_length=len(body))
    flow = Flow(request, policy, provider, client_address=("127.0.0.1", 50000))
    flow.upstream_url = routing.upstream_url(provider, "https", host, port, path)
    return flow
