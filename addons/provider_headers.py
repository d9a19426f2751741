"""Headers a provider needs that callers often leave out (``set_headers`` in
the policy, e.g. ``anthropic-version``). Set only when absent: a caller that
pins its own API version keeps it."""

from __future__ import annotations

from proxy.flow import Flow


class ProviderHeaders:
    name = "provider_headers"

    def request(self, flow: Flow) -> None:
        provider = flow.provider
        if provider is None or not provider.set_headers:
            return
        headers = flow.request.headers
        for name, value in provider.set_headers:
            if name not in headers:
                headers[name] = value
