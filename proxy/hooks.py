"""The addon pipeline: named hooks, called in addon order.

An addon is any object with methods named after hooks; each may be a plain
function or a coroutine function. A plain decision hook may also return an
awaitable when (only sometimes) it has to wait: the common case then costs
no coroutine. The manager builds one tuple of bound
methods per hook when addons are registered, so a request pays for a tuple
walk, not a ``getattr`` scan.

Failure rule (written down because it is the security property): an exception
in a *decision* hook (``configure``, ``request``, ``responseheaders``) fails
closed: the flow is answered with our 502 and nothing goes upstream; the log
names the addon and the exception type, never the message (it may quote a
header). Observer hooks (``response``, ``error``, ``running``, ``done``) log
the same way and carry on.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

from proxy.errors import AddonFailed
from proxy.flow import Flow
from proxy.policy import Policy

log = logging.getLogger("sidekey.addons")

HOOKS: dict[str, str] = {
    "configure": "(policy) A policy was loaded or reloaded, before it takes effect. "
    "Raise to reject it (the old one stays active).",
    "running": "() The listener is accepting connections. Start background tasks here.",
    "request": "(flow) A request head was read and its provider matched. May rewrite "
    "flow.request / flow.upstream_url, or set flow.response to answer locally "
    "(nothing then goes upstream).",
    "responseheaders": "(flow) Upstream response headers arrived; the body has not been "
    "streamed yet. May change flow.response.status/headers, or replace flow.response "
    "with a local one (then the upstream body is discarded).",
    "response": "(flow) The response was fully sent to the caller. Observe only.",
    "error": "(flow) The flow failed (flow.error is set): upstream failure, client gone, stream cut. Observe only.",
    "done": "() sidekey is shutting down. Stop background tasks, flush.",
}

Call = tuple[str, Callable[..., Any], bool]  # (addon name, bound method, is async)


def addon_name(addon: object) -> str:
    return getattr(addon, "name", None) or type(addon).__name__


class AddonManager:
    def __init__(self, addons: Sequence[object] = ()) -> None:
        self.addons: list[object] = []
        self._hooks: dict[str, tuple[Call, ...]] = {h: () for h in HOOKS}
        for addon in addons:
            self.add(addon)

    def add(self, addon: object) -> None:
        self.addons.append(addon)
        for hook in HOOKS:
            method = getattr(addon, hook, None)
            if method is None:
                continue
            if not callable(method):
                raise TypeError(f"{addon_name(addon)}.{hook} is not callable")
            call: Call = (addon_name(addon), method, inspect.iscoroutinefunction(method))
            self._hooks[hook] = (*self._hooks[hook], call)

    async def configure(self, policy: Policy) -> None:
        """Raises the addon's exception: the caller keeps the old policy."""
        for _name, method, is_async in self._hooks["configure"]:
            result = method(policy)
            if is_async:
                await result

    async def decide(self, hook: str, flow: Flow) -> None:
        """Run a decision hook; any exception becomes AddonFailed (fail closed)."""
        for name, method, is_async in self._hooks[hook]:
            try:
                result = method(flow)
                if is_async or result is not None:  # a plain hook may hand back an awaitable when it must wait
                    await result
            except Exception as exc:  # noqa: BLE001 - fail closed on anything
                log.error("addon %s failed in %s: %s (flow %s)", name, hook, type(exc).__name__, flow.id)
                raise AddonFailed(flow.provider_name) from None
            if hook == "request" and flow.response is not None:
                return  # answered locally: later request addons do not run

    async def observe(self, hook: str, *args: Any) -> None:
        """Run an observer hook; an exception is logged and the next addon runs."""
        for name, method, is_async in self._hooks[hook]:
            try:
                result = method(*args)
                if is_async:
                    await result
            except Exception as exc:  # noqa: BLE001 - observers must not break flows
                log.error("addon %s failed in %s: %s", name, hook, type(exc).__name__)

    def __repr__(self) -> str:
        return f"AddonManager({[addon_name(a) for a in self.addons]})"
