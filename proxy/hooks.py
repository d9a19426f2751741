"""The addon pipeline: typed hooks, called in addon order.

Each hook is declared once below as a frozen dataclass (mitmproxy's
``hooks.py`` is the model): its fields are the hook's arguments, its
docstring says when it fires and what it may change. An addon is any object
with methods named after these hooks; each may be a plain function or a
coroutine function. A plain decision hook may also return an awaitable when
(only sometimes) it has to wait: the common case then costs no coroutine.

The manager builds one tuple of bound methods per hook when addons are
registered, so a request pays for a tuple walk, never a ``getattr`` scan; and
after each ``configure`` it drops the calls an addon declared idle under the
new policy (``idle_hooks``), so e.g. per-key limits cost nothing on a policy
without them. This table is the only place an addon attribute is looked up
by name (a unit test holds the rest of the code to that).

What an addon offers beyond hooks (secrets, a usage report, metrics) is a
typed capability (``proxy.capabilities``), asked for with ``capability``.

Failure rule (written down because it is the security property): an exception
in a *decision* hook (``configure``, ``request``, ``upstream_attempt``,
``responseheaders``) fails closed: the flow is answered with our 502 and
nothing goes upstream; the log names the addon and the exception type, never
the message (it may quote a header). A ``ProxyError`` from ``upstream_attempt``
is the attempt's outcome (a missing credential, a key over its own limit) and
reaches the forwarder as it is. Observer hooks (``response``, ``error``,
``running``, ``done``) log the same way and carry on.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from proxy.errors import AddonFailed, ProxyError
from proxy.flow import Flow
from proxy.policy import Policy

if TYPE_CHECKING:
    from proxy.attempt import Attempt
    from proxy.capabilities import Capability
    from proxy.runtime import Runtime

log = logging.getLogger("sidekey.addons")

Kind = Literal["decision", "observer"]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Hook:
    """A hook's specification; the fields are its arguments, in call order."""

    name: ClassVar[str]
    kind: ClassVar[Kind]

    @classmethod
    def arity(cls) -> int:
        return len(fields(cls))


@dataclass(frozen=True, slots=True)
class SetupHook(Hook):
    """Once, when the engine is built: what the addon may use beside the flows
    (pools, groups, Redis, clock, state-change notices, health probes)."""

    runtime: Runtime
    name: ClassVar[str] = "setup"
    kind: ClassVar[Kind] = "observer"


@dataclass(frozen=True, slots=True)
class ConfigureHook(Hook):
    """A policy was loaded or reloaded, before it takes effect. Raise to
    reject it (the old one stays active)."""

    policy: Policy
    name: ClassVar[str] = "configure"
    kind: ClassVar[Kind] = "decision"


@dataclass(frozen=True, slots=True)
class RunningHook(Hook):
    """The listener is accepting connections. Start background tasks here."""

    name: ClassVar[str] = "running"
    kind: ClassVar[Kind] = "observer"


@dataclass(frozen=True, slots=True)
class RequestHook(Hook):
    """A request head was read and its provider matched. May rewrite
    flow.request / flow.upstream_url, or set flow.response to answer locally
    (nothing then goes upstream)."""

    flow: Flow
    name: ClassVar[str] = "request"
    kind: ClassVar[Kind] = "decision"


@dataclass(frozen=True, slots=True)
class UpstreamAttemptHook(Hook):
    """One attempt is about to go to one member (of the matched provider or a
    fallback): set what belongs to that member and provider on
    ``attempt.headers`` / ``attempt.url`` / ``attempt.body`` (the credential,
    required headers, placeholder values; replace headers or body with the
    attempt's own copy rather than change the flow's, which observers record),
    take its own limits (``attempt.hold_off`` to have the forwarder try
    another member). Runs again on every retry and failover. An addon that
    names this hook in ``runs_last`` (request signing: it must sign the
    request as it is finally sent) runs after every other, whatever the
    addon order; only one addon may. A health check's request runs it too
    (``attempt.probe``, with a flow of its own that no other hook sees)."""

    flow: Flow
    attempt: Attempt
    name: ClassVar[str] = "upstream_attempt"
    kind: ClassVar[Kind] = "decision"


@dataclass(frozen=True, slots=True)
class ResponseHeadersHook(Hook):
    """Upstream response headers arrived; the body has not been streamed yet.
    May change flow.response.status/headers, or replace flow.response with a
    local one (then the upstream body is discarded)."""

    flow: Flow
    name: ClassVar[str] = "responseheaders"
    kind: ClassVar[Kind] = "decision"


@dataclass(frozen=True, slots=True)
class ResponseHook(Hook):
    """The response was fully sent to the caller. Observe only."""

    flow: Flow
    name: ClassVar[str] = "response"
    kind: ClassVar[Kind] = "observer"


@dataclass(frozen=True, slots=True)
class ErrorHook(Hook):
    """The flow failed (flow.error is set): upstream failure, client gone,
    stream cut. Observe only."""

    flow: Flow
    name: ClassVar[str] = "error"
    kind: ClassVar[Kind] = "observer"


@dataclass(frozen=True, slots=True)
class WebSocketStartHook(Hook):
    """A WebSocket upgrade was answered 101 and the session starts
    (``flow.metadata["websocket"]`` is ``{"event": "open"}``). Observe only; the
    session's end is the ``response`` (or ``error``) hook, with the summary in
    ``flow.metadata["websocket"]``."""

    flow: Flow
    name: ClassVar[str] = "websocket_start"
    kind: ClassVar[Kind] = "observer"


@dataclass(frozen=True, slots=True)
class DoneHook(Hook):
    """sidekey is shutting down. Stop background tasks, flush."""

    name: ClassVar[str] = "done"
    kind: ClassVar[Kind] = "observer"


@dataclass(frozen=True, slots=True)
class IdleHooksHook(Hook):
    """After ``configure``: the names of this addon's hooks that have nothing
    to do under the policy it just accepted (they are then not called)."""

    name: ClassVar[str] = "idle_hooks"
    kind: ClassVar[Kind] = "observer"


SPECS: tuple[type[Hook], ...] = (
    SetupHook, ConfigureHook, RunningHook, RequestHook, UpstreamAttemptHook,
    ResponseHeadersHook, ResponseHook, ErrorHook, WebSocketStartHook, DoneHook,
)  # fmt: skip
# name -> when it fires (the docs and ``addons/__init__`` point here)
HOOKS: dict[str, str] = {spec.name: " ".join((spec.__doc__ or "").split()) for spec in SPECS}

Call = tuple[str, Callable[..., Any], bool]  # (addon name, bound method, is async)


def addon_name(addon: object) -> str:
    return getattr(addon, "name", None) or type(addon).__name__


def _failed(name: str, flow: Flow, exc: Exception) -> AddonFailed:
    log.error("addon %s failed in upstream_attempt: %s (flow %s)", name, type(exc).__name__, flow.id)
    return AddonFailed(flow.provider_name)


class AddonManager:
    def __init__(self, addons: Sequence[object] = ()) -> None:
        self.addons: list[object] = []
        self._all: dict[str, tuple[Call, ...]] = {h: () for h in HOOKS}  # every addon's calls
        self._hooks: dict[str, tuple[Call, ...]] = dict(self._all)  # without the idle ones
        self._idle_of: list[tuple[str, Callable[[], Any]]] = []
        self._last: dict[str, str] = {}  # hook -> the addon that runs last in it (``runs_last``)
        self.attempt_calls: tuple[Call, ...] = ()  # the per-attempt hot path reads it directly
        for addon in addons:
            self.add(addon)

    def add(self, addon: object) -> None:
        self.addons.append(addon)
        name = addon_name(addon)
        runs_last = frozenset(getattr(addon, "runs_last", ()))
        for spec in SPECS:
            method = getattr(addon, spec.name, None)
            if method is None:
                continue
            if not callable(method):
                raise TypeError(f"{name}.{spec.name} is not callable")
            call: Call = (name, method, inspect.iscoroutinefunction(method))
            calls, last = self._all[spec.name], self._last.get(spec.name)
            if spec.name in runs_last:
                if last is not None:
                    raise TypeError(f"{name} and {last} both ask to run last in {spec.name}")
                self._last[spec.name] = name
                self._all[spec.name] = (*calls, call)
            elif last is not None:  # keep the last one last: this one goes just before it
                self._all[spec.name] = (*calls[:-1], call, calls[-1])
            else:
                self._all[spec.name] = (*calls, call)
        idle = getattr(addon, IdleHooksHook.name, None)
        if callable(idle):
            self._idle_of.append((name, idle))
        self._drop_idle()

    def capability(self, cap: Capability[T]) -> T | None:
        """The first addon that offers ``cap`` (its ``provides``), typed as the capability says."""
        for addon in self.addons:
            if cap in getattr(addon, "provides", ()):
                return cap.of(addon)
        return None

    def setup(self, runtime: Runtime) -> None:
        """Raises the addon's exception: an addon that cannot set up must not start."""
        for _name, method, _is_async in self._all["setup"]:
            method(runtime)

    async def configure(self, policy: Policy) -> None:
        """Raises the addon's exception: the caller keeps the old policy."""
        for _name, method, is_async in self._all["configure"]:
            result = method(policy)
            if is_async:
                await result
        self._drop_idle()

    def _drop_idle(self) -> None:
        idle: set[tuple[str, str]] = set()
        for name, idle_hooks in self._idle_of:
            idle.update((name, hook) for hook in idle_hooks())
        self._hooks = {hook: tuple(c for c in calls if (c[0], hook) not in idle) for hook, calls in self._all.items()}
        self.attempt_calls = self._hooks["upstream_attempt"]

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

    def upstream_attempt(self, flow: Flow, attempt: Attempt) -> Awaitable[None] | None:
        """Run ``upstream_attempt``; an awaitable only when a hook has to wait.
        A ProxyError is the attempt's outcome and passes; anything else fails
        closed like any decision hook."""
        calls = self.attempt_calls
        for call in calls:  # no enumerate: the index is only needed on the rare awaiting path
            name, method, is_async = call
            try:
                result = method(flow, attempt)
            except ProxyError:
                raise
            except Exception as exc:  # noqa: BLE001 - fail closed on anything
                raise _failed(name, flow, exc) from None
            if is_async or result is not None:
                return self._attempt_rest(flow, attempt, result, name, calls[calls.index(call) + 1 :])
            if attempt.hold_off:
                return None  # this member is not used: the others' hooks need not run
        return None

    async def _attempt_rest(self, flow: Flow, attempt: Attempt, pending: Awaitable[None], name: str,
                            rest: tuple[Call, ...]) -> None:  # fmt: skip
        try:
            await pending
        except ProxyError:
            raise
        except Exception as exc:  # noqa: BLE001 - fail closed on anything
            raise _failed(name, flow, exc) from None
        for name, method, is_async in rest:
            if attempt.hold_off:
                return
            try:
                result = method(flow, attempt)
                if is_async or result is not None:
                    await result
            except ProxyError:
                raise
            except Exception as exc:  # noqa: BLE001 - fail closed on anything
                raise _failed(name, flow, exc) from None

    async def observe(self, hook: str, *args: Any) -> None:
        """Run an observer hook; an exception is logged and the next addon runs."""
        for name, method, is_async in self._hooks[hook]:
            try:
                result = method(*args)
                if is_async:
                    await result
            except Exception as exc:  # noqa: BLE001 - observers must not break flows
                log.error("addon %s failed in %s: %s", name, hook, type(exc).__name__)

    def called(self, hook: str) -> list[str]:
        """The addons whose ``hook`` runs, in order (the idle ones left out)."""
        return [name for name, _method, _is_async in self._hooks[hook]]

    def __repr__(self) -> str:
        return f"AddonManager({[addon_name(a) for a in self.addons]})"
