"""One attempt of a request at one upstream member: what the per-attempt
hook (``upstream_attempt``) sees and changes, and the member's in-flight
lease.

The lease is the one place a member's ``in_flight`` count moves: taken when
the attempt is sent, given back once (``release`` is idempotent) when the
attempt failed or, for the answer the caller gets, when that response is
released at the end of the flow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from multidict import CIMultiDict

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from proxy.balance import UpstreamState
    from proxy.policy import Provider


class Attempt:
    __slots__ = ("member", "provider", "headers", "url", "body", "number", "hold_off", "_held")
    probe: ClassVar[bool] = False  # a health check's attempt (``Probe``), not a caller's request

    def __init__(self, member: UpstreamState, provider: Provider, headers: CIMultiDict[str], url: str,
                 number: int, body: bytes | AsyncIterator[bytes] | None = None) -> None:  # fmt: skip
        self.member = member
        self.provider = provider  # the matched provider, or the fallback being tried
        # The outgoing request's headers (hooks set the credential here). The
        # flow's own, unless a hook gave this attempt a copy (a placeholder's
        # value must not stay on flow.request, which audit and dlq read).
        self.headers = headers
        self.url = url  # where it goes; a query credential is appended by the hook
        self.body = body  # what is sent: flow.request.body, or this attempt's own (placeholders put in)
        self.number = number  # 1 for the first attempt of the request
        # Set by a hook: this member cannot take the request for this many
        # seconds (its own quota is spent); the forwarder tries another.
        self.hold_off = 0.0
        self._held = False

    def hold(self) -> None:
        """Count the attempt in its member's in-flight requests (it is being sent)."""
        self.member.in_flight += 1
        self._held = True

    def release(self) -> None:
        """The attempt failed, or its response was released: no longer in flight."""
        if self._held:
            self._held = False
            self.member.in_flight -= 1

    def __repr__(self) -> str:  # never headers or the URL: they carry the credential
        return f"Attempt({self.number} {self.member.provider}/{self.member.name})"


class Probe(Attempt):
    """A health check's one attempt (``runtime.probe``): the same ``upstream_attempt``
    hooks set its credential, headers and signature, so a check reaches the member as
    traffic does. Hooks that count callers' traffic (per-key limits) leave it alone:
    a key at its quota is still a reachable upstream."""

    __slots__ = ()
    probe = True
