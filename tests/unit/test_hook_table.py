"""The hook table is the only place an addon is looked at by name.

Before it, five hooks (inject, admit_member, bind, secret_available,
usage_report) were found with ``getattr`` in the engine and the admin API,
out of mypy's sight. These tests fail if that comes back, and hold the
built-in addons to the declared hook signatures."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from addons import default_addons
from addons.metrics import Metrics
from addons.usage import UsageMeter
from proxy import capabilities
from proxy.attempt import Attempt
from proxy.balance import UpstreamState
from proxy.capabilities import METRICS, SECRETS, USAGE_REPORT
from proxy.errors import AddonFailed, CredentialUnavailable
from proxy.flow import Flow
from proxy.hooks import HOOKS, SPECS, AddonManager
from proxy.policy import Policy
from proxy.testing import make_flow, make_provider

ROOT = Path(__file__).resolve().parents[2]
# Names an addon answers to: the hooks, and the methods of every capability protocol.
ADDON_NAMES = (
    set(HOOKS)
    | {"idle_hooks", "provides"}
    | {
        name
        for proto in vars(capabilities).values()
        if inspect.isclass(proto) and getattr(proto, "_is_protocol", False)
        for name in vars(proto)
        if not name.startswith("_")
    }
    | {"bind", "inject", "admit_member", "secret_available", "usage_report", "usable"}
)


def _lookups_by_name(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        if node.func.id not in ("getattr", "hasattr") or len(node.args) < 2:
            continue
        name = node.args[1]
        if isinstance(name, ast.Constant) and name.value in ADDON_NAMES:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.func.id}(..., {name.value!r})")
    return found


def test_no_addon_attribute_is_looked_up_by_name_outside_the_hook_table() -> None:
    files = [p for d in ("proxy", "addons") for p in sorted((ROOT / d).rglob("*.py")) if p.name != "hooks.py"]
    assert files
    found = [hit for p in files for hit in _lookups_by_name(p)]
    assert found == []


def test_the_checker_sees_a_lookup() -> None:
    bad = ROOT / "tests" / "unit" / "_lookup_sample.py"
    bad.write_text("def f(a):\n    return getattr(a, 'usage_report', None)\n")
    try:
        assert _lookups_by_name(bad) == ["tests/unit/_lookup_sample.py:2 getattr(..., 'usage_report')"]
    finally:
        bad.unlink()


RETIRED = ("bind",)  # replaced by setup(runtime): an addon still defining it would never be called


@pytest.mark.parametrize("addon", default_addons(), ids=lambda a: type(a).__name__)
def test_builtin_hooks_take_the_declared_arguments(addon: object) -> None:
    assert not [name for name in RETIRED if callable(getattr(addon, name, None))], "a hook nobody calls"
    for spec in SPECS:
        method = getattr(addon, spec.name, None)
        if method is None:
            continue
        params = [p for p in inspect.signature(method).parameters.values() if p.default is inspect.Parameter.empty]
        assert len(params) == spec.arity(), f"{type(addon).__name__}.{spec.name}"


def test_capabilities_are_typed_and_found() -> None:
    addons = default_addons()
    manager = AddonManager(addons)
    metrics, usage = manager.capability(METRICS), manager.capability(USAGE_REPORT)
    assert isinstance(metrics, Metrics)
    assert isinstance(usage, UsageMeter)
    secrets = manager.capability(SECRETS)
    assert secrets is addons[1]  # the credentials addon, after placeholders
    assert AddonManager([Metrics()]).capability(SECRETS) is None


class Member:
    name = "tagger"

    def __init__(self, idle: bool) -> None:
        self.idle, self.calls = idle, 0

    def configure(self, policy: Policy) -> None:
        self.idle = not policy.providers

    def idle_hooks(self) -> tuple[str, ...]:
        return ("upstream_attempt",) if self.idle else ()

    def upstream_attempt(self, flow: Flow, attempt: Attempt) -> None:
        self.calls += 1
        if flow.metadata.get("fail") == "proxy":
            raise CredentialUnavailable(attempt.provider.name)
        if flow.metadata.get("fail") == "bug":
            raise KeyError("sk-never-logged")


def _attempt(flow: Flow) -> Attempt:
    provider = flow.provider
    assert provider is not None
    state = UpstreamState(provider, provider.targets[0], "h", 443)
    return Attempt(state, provider, flow.request.headers, "https://h/", 1)


async def _run(manager: AddonManager, flow: Flow) -> None:
    pending = manager.upstream_attempt(flow, _attempt(flow))
    if pending is not None:
        await pending


@pytest.mark.asyncio
async def test_idle_hooks_are_not_called_and_proxy_errors_pass() -> None:
    addon = Member(idle=True)
    manager = AddonManager([addon])
    flow = make_flow()
    await _run(manager, flow)
    assert addon.calls == 0  # idle from the start
    await manager.configure(Policy(providers=(make_provider(),)))
    await _run(manager, flow)
    assert addon.calls == 1
    flow.metadata["fail"] = "proxy"
    with pytest.raises(CredentialUnavailable):  # the attempt's outcome, not an addon failure
        await _run(manager, flow)
    flow.metadata["fail"] = "bug"
    with pytest.raises(AddonFailed):  # fails closed
        await _run(manager, flow)
    await manager.configure(Policy(providers=()))
    await _run(manager, flow)
    assert addon.calls == 3


def test_attempt_lease_is_released_once() -> None:
    flow = make_flow()
    attempt = _attempt(flow)
    attempt.hold()
    assert attempt.member.in_flight == 1
    attempt.release()
    attempt.release()
    assert attempt.member.in_flight == 0
    assert "sk-" not in repr(attempt)


@pytest.mark.asyncio
async def test_builtin_addons_idle_where_the_policy_gives_them_nothing() -> None:
    import dataclasses

    from proxy.policy import Rule, SecretRef, Target

    manager = AddonManager(default_addons())
    plain = make_provider()
    await manager.configure(Policy(providers=(plain,)))
    assert manager.called("upstream_attempt") == ["credentials"]
    assert "limits" not in manager.called("request") and "limits" not in manager.called("responseheaders")
    assert "limits" in manager.called("response") and "limits" in manager.called("error")  # settles old flows
    rule = Rule("requests", 10, 60.0)
    keyed = dataclasses.replace(plain, targets=(Target("a", limits=(rule,)),), limits=(rule,),
                                set_headers=(("anthropic-version", "1"),))  # fmt: skip
    await manager.configure(Policy(providers=(keyed,)))
    assert manager.called("upstream_attempt") == ["credentials", "provider_headers", "limits"]
    assert "limits" in manager.called("request") and "limits" in manager.called("responseheaders")
    assert "placeholders" not in manager.called("request") and "placeholders" not in manager.called("response")
    named = dataclasses.replace(plain, placeholders=(("SIDEKEY_WEBHOOK_TOKEN", SecretRef("env", "HOOK")),))
    await manager.configure(Policy(providers=(named,)))
    assert manager.called("upstream_attempt") == ["placeholders", "credentials"]
    assert manager.called("request")[0] == "placeholders" and "placeholders" in manager.called("error")
