"""Placeholders anywhere in the request (``placeholders:`` on a provider; the
rules are ``proxy.placeholders``).

Two halves, like the credentials addon's:

- ``request`` (first in the pipeline, before the credentials addon strips
  the caller's credential headers, so a name there is seen too): finds every
  known placeholder name in the path and query, the header values and a body
  held whole. A name of another provider, or any name on a request to an
  unmatched host (plain http through the proxy), refuses the request with 403
  ``placeholder_misdirected`` and a WARNING on ``sidekey.security`` (name,
  owner, host; never a value). Names of the request's own provider are noted
  for the attempts.
- ``upstream_attempt`` (every attempt): puts the current values in, on the
  attempt's own URL, a copy of the headers and its own body, never on
  ``flow.request`` (audit, dead letters and logs read that, and see the
  names). An attempt to a fallback provider is refused the same way: the
  values belong to the matched provider's hosts only.

Cost: a policy without placeholders leaves every hook idle. With them, a
request pays a substring test per header value, one on the path and one on
a body held whole; the regex and dict lookups run only where the prefix is.
Bodies streamed (larger than the provider's ``retry.replay_max_bytes``) and
blind tunnels are never looked into.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from proxy.attempt import Attempt
from proxy.capabilities import SECRETS, Secrets
from proxy.errors import CredentialUnavailable, PlaceholderMisdirected
from proxy.flow import Flow, Response
from proxy.placeholders import (
    PREFIX,
    BadValue,
    in_body,
    in_header,
    in_url,
    misdirected,
    names_in,
    names_in_bytes,
    substitutable,
)
from proxy.policy import STATIC_KINDS, Policy, Provider, SecretRef

if TYPE_CHECKING:
    from proxy.runtime import Runtime

log = logging.getLogger("sidekey.security")

MAX_FLOWS = 4096  # flows in flight holding placeholders; a flow that never ended is forgotten first
HOOKS = ("request", "upstream_attempt", "response", "error")


class Use:
    """What one flow carries of its provider's placeholders."""

    __slots__ = ("provider", "names", "headers", "url", "body")

    def __init__(self, provider: Provider, names: frozenset[str], headers: tuple[tuple[str, str], ...], url: bool,
                 body: bool) -> None:  # fmt: skip
        self.provider = provider
        self.names = names  # the names found, all this provider's
        self.headers = headers  # (name, value as the caller sent it) of each header holding one
        self.url = url  # the path or query holds one
        self.body = body  # a JSON or form body held whole holds one

    def __repr__(self) -> str:  # names only: header values may hold anything the caller sent
        return f"Use({self.provider.name} {sorted(self.names)})"


class Placeholders:
    name = "placeholders"

    def __init__(self) -> None:
        self._active = False
        self._uses: dict[str, Use] = {}  # flow id -> its placeholders, until the flow ends
        self._runtime: Runtime | None = None
        self._secrets_of: Secrets | None = None  # the credentials addon, found on first use
        self.refused = 0

    def setup(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def configure(self, policy: Policy) -> None:
        self._active = bool(policy.placeholder_owners)

    def idle_hooks(self) -> tuple[str, ...]:
        return () if self._active else HOOKS

    def statistics(self) -> dict[str, int]:
        return {"in_flight": len(self._uses), "refused": self.refused}

    def __repr__(self) -> str:
        return f"Placeholders(in_flight={len(self._uses)}, refused={self.refused})"

    # -- request -------------------------------------------------------------
    def request(self, flow: Flow) -> None:
        owners = flow.policy.placeholder_owners
        if not owners:
            return
        req = flow.request
        url_names = names_in(req.path, owners)
        header_hits: list[tuple[str, str]] = []
        names = list(url_names)
        for key, value in req.headers.items():
            if PREFIX in value and (found := names_in(value, owners)):
                header_hits.append((key, value))
                names += found
        body = req.body
        body_names = names_in_bytes(body, owners) if isinstance(body, bytes) else []
        names += body_names
        if not names:
            return
        provider = flow.provider
        bad = misdirected(names, owners, provider.name if provider is not None else None)
        if bad is not None or provider is None:
            bad = bad or names[0]
            flow.response = Response.from_error(self.refuse(flow, bad, owners[bad], req.host))
            return
        if len(self._uses) >= MAX_FLOWS:
            del self._uses[next(iter(self._uses))]
        body_ok = bool(body_names) and substitutable(req.headers.get("content-type"))
        self._uses[flow.id] = Use(provider, frozenset(names), tuple(header_hits), bool(url_names), body_ok)

    def refuse(self, flow: Flow, name: str, owner: str, host: str) -> PlaceholderMisdirected:
        self.refused += 1
        event = {"event": "placeholder_misdirected", "placeholder": name, "owner": owner, "host": host}
        log.warning("placeholder_misdirected: placeholder %s of provider %s sent to host %s; refused (flow %s)",
                    name, owner, host, flow.id, extra=event)  # fmt: skip
        return PlaceholderMisdirected(flow.provider_name, placeholder=name, host=host)

    # -- every attempt -------------------------------------------------------
    def upstream_attempt(self, flow: Flow, attempt: Attempt) -> Awaitable[None] | None:
        use = self._uses.get(flow.id) if self._uses else None
        if use is None:
            return None
        provider = attempt.provider
        if provider is not use.provider:  # a fallback: the values belong to the matched provider's hosts
            raise self.refuse(flow, min(use.names), use.provider.name, attempt.member.host)
        refs = [ref for name, ref in provider.placeholders if name in use.names]
        secrets = self._secrets()
        values = {name: v for name, ref in provider.placeholders if name in use.names
                  and (v := secrets.reference_value(ref)) is not None}  # fmt: skip
        if len(values) < len(refs):
            if all(ref.kind in STATIC_KINDS for ref in refs):  # env:/file: are read already: nothing to wait for
                raise CredentialUnavailable(provider.name)
            return self._first_use(attempt, use, secrets, refs)
        self._put(attempt, use, values)
        return None

    async def _first_use(self, attempt: Attempt, use: Use, secrets: Secrets, refs: list[SecretRef]) -> None:
        """A store's value not fetched yet: wait for its one fetch (a failing
        store answers at once); still none: 503, as a missing credential does."""
        await secrets.ensure(refs)
        values = {name: v for name, ref in use.provider.placeholders if name in use.names
                  and (v := secrets.reference_value(ref)) is not None}  # fmt: skip
        if len(values) < len(refs):
            raise CredentialUnavailable(use.provider.name)
        self._put(attempt, use, values)

    def _put(self, attempt: Attempt, use: Use, values: dict[str, str]) -> None:
        if use.url:
            attempt.url = in_url(attempt.url, values)
        if use.headers:
            headers = attempt.headers.copy()  # the flow's stay as the caller sent them
            for key, _value in use.headers:
                headers.popall(key, None)
            try:
                for key, value in use.headers:
                    headers.add(key, in_header(value, values))
            except BadValue:
                log.warning("provider %s: a placeholder's value cannot go in a header (line break or NUL)",
                            use.provider.name)  # fmt: skip
                raise CredentialUnavailable(use.provider.name) from None
            attempt.headers = headers
        if use.body and isinstance(attempt.body, bytes):
            attempt.body = in_body(attempt.body, attempt.headers.get("content-type"), values)

    def _secrets(self) -> Secrets:
        if self._secrets_of is None:
            self._secrets_of = self._runtime.capability(SECRETS) if self._runtime is not None else None
            if self._secrets_of is None:
                raise RuntimeError("placeholders need the credentials addon")  # fails closed: 502
        return self._secrets_of

    # -- observers -------------------------------------------------------------
    def response(self, flow: Flow) -> None:
        if self._uses:
            self._uses.pop(flow.id, None)

    def error(self, flow: Flow) -> None:
        if self._uses:
            self._uses.pop(flow.id, None)
