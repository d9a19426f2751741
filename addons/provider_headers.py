"""Headers a provider needs that callers often leave out (``set_headers`` in
the policy, e.g. ``anthropic-version``). Set only when absent: a caller that
pins its own API version keeps it."""

from __future__ import annotations

from proxy.attempt import Attempt
from proxy.flow import Flow
from proxy.policy import Policy


class ProviderHeaders:
    """Per attempt: a fallback provider gets its own headers, not the matched one's."""

    name = "provider_headers"

    def __init__(self) -> None:
        self._idle: tuple[str, ...] = ()

    def configure(self, policy: Policy) -> None:
        self._idle = () if any(p.set_headers for p in policy.providers) else ("upstream_attempt",)

    def idle_hooks(self) -> tuple[str, ...]:
        return self._idle

    def upstream_attempt(self, flow: Flow, attempt: Attempt) -> None:
        set_headers = attempt.provider.set_headers
        if not set_headers:
            return
        headers = attempt.headers
        for name, value in set_headers:
            if name not in headers:
                headers[name] = value
