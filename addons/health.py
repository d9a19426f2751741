"""Active health checks per upstream member, and alerts on health and circuit
changes to a webhook.

Checks: every provider with ``health_check`` has each member with a fixed
address checked every ``interval`` (plus up to 10% jitter, so sidecars
started together do not fire together). A check is sent as an attempt of
traffic is (``runtime.probe``): the same ``upstream_attempt`` hooks set the
member's credential, the provider's headers and a signature, then the same
pools and address guard; per-key limits leave it alone. The
result feeds ``UpstreamState.record_check``; an unhealthy member is then
skipped by selection while healthy ones exist.

Alerts: the engine tells this addon when a member turns unhealthy or
healthy, or its circuit opens or closes. Each change is one JSON POST to
``alerts.webhook``, sent from a bounded queue by a background task with
bounded retries, so a slow or dead webhook never blocks a request. An
alert holds names, states and error codes: never a secret, never a URL.
The webhook URL itself may be a secret (Slack-style) and is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import random
import time
from typing import TYPE_CHECKING, Any

import aiohttp

from proxy.balance import Transition, UpstreamState
from proxy.policy import Alerts, Policy, Provider, SecretRef
from proxy.secrets import resolve_ref

if TYPE_CHECKING:
    from proxy.runtime import Runtime

log = logging.getLogger("sidekey.health")

QUEUE_MAX = 256  # alerts waiting to be sent; beyond it the oldest are dropped
TICK = 0.1  # seconds between looks at which checks are due


class HealthChecks:
    name = "health"

    def __init__(self, *, tick: float = TICK) -> None:
        self.runtime: Runtime | None = None
        self.policy: Policy | None = None
        self.tick = tick
        self.due: dict[tuple[str, str, str, int], float] = {}  # state key -> monotonic time of the next check
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_MAX)
        self.counters = {"checks": 0, "checks_failed": 0, "alerts_sent": 0, "alerts_failed": 0, "alerts_dropped": 0}
        self._webhook: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._checks: set[asyncio.Task[None]] = set()
        self._reconfigured = asyncio.Event()

    def setup(self, runtime: Runtime) -> None:
        self.runtime = runtime
        runtime.on_state_change(self.on_change)

    async def configure(self, policy: Policy) -> None:
        self.policy = policy
        self._reconfigured.set()
        self._webhook = await asyncio.to_thread(_resolve, policy.alerts) if policy.alerts else None

    def running(self) -> None:
        self._tasks = [
            asyncio.create_task(self._check_loop(), name="sidekey-health-checks"),
            asyncio.create_task(self._alert_loop(), name="sidekey-alerts"),
        ]

    async def done(self) -> None:
        for task in [*self._tasks, *self._checks]:
            task.cancel()
        for task in [*self._tasks, *self._checks]:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- alerts ------------------------------------------------------------------
    def on_change(self, state: UpstreamState, change: Transition) -> None:
        if self._webhook is None:
            return
        alert = {
            "event": change,
            "provider": state.provider,
            "upstream": state.name,
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "state": {
                "healthy": state.healthy,
                "circuit": state.breaker.state,
                "consecutive_failures": state.consecutive,
                "error_rate": round(state.error_rate, 3),
                "last_status": state.last_status,
                "last_error": state.last_error,
            },
        }
        if self.queue.full():
            self.queue.get_nowait()
            self.counters["alerts_dropped"] += 1
        self.queue.put_nowait(alert)

    async def _alert_loop(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=5.0)
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
            while True:
                alert = await self.queue.get()
                alerts = self.policy.alerts if self.policy else None
                if self._webhook is None or alerts is None:
                    continue  # alerts were removed by a reload
                await self._post(session, self._webhook, alerts, alert)

    async def _post(self, session: aiohttp.ClientSession, url: str, alerts: Alerts, alert: dict[str, Any]) -> None:
        body = json.dumps(alert).encode()
        for attempt in range(alerts.attempts):
            try:
                async with asyncio.timeout(alerts.timeout):
                    async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
                        await resp.read()
                        if resp.status < 300:
                            self.counters["alerts_sent"] += 1
                            return
                        problem = f"status {resp.status}"
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                problem = type(exc).__name__  # never str(exc): it quotes the URL
            if attempt + 1 < alerts.attempts:
                await asyncio.sleep(min(0.5 * 2**attempt, 10.0))
        self.counters["alerts_failed"] += 1
        log.warning("alert %s for %s/%s not delivered: %s", alert["event"], alert["provider"], alert["upstream"],
                    problem)  # fmt: skip

    # -- active checks -----------------------------------------------------------
    async def _check_loop(self) -> None:
        while True:
            runtime, policy = self.runtime, self.policy
            if runtime is None or policy is None or not any(p.health_check for p in policy.providers):
                self._reconfigured.clear()  # nothing to check: sleep until a policy says otherwise
                await self._reconfigured.wait()
                continue
            await asyncio.sleep(self.tick)
            now = time.monotonic()
            for provider in policy.providers:
                check = provider.health_check
                if check is None:
                    continue
                for state in runtime.groups.known(provider):
                    key = (state.provider, state.name, state.host, state.port)
                    due = self.due.get(key)
                    if due is None:  # first sight: spread the first checks over one interval
                        self.due[key] = now + check.interval * random.random()
                    elif now >= due:
                        self.due[key] = now + check.interval * (1 + 0.1 * random.random())
                        task = asyncio.create_task(self._check(runtime, provider, state))
                        self._checks.add(task)
                        task.add_done_callback(self._checks.discard)

    async def _check(self, runtime: Runtime, provider: Provider, state: UpstreamState) -> None:
        check = provider.health_check
        assert check is not None
        passed = False
        try:
            async with asyncio.timeout(check.timeout):
                passed = await runtime.probe(provider, state, check.method, check.path) in check.expect
        except Exception as exc:  # noqa: BLE001 - any failure is a failed check; the type only is logged
            log.debug("health check %s/%s failed: %s", provider.name, state.name, type(exc).__name__)
        self.counters["checks"] += 1
        if not passed:
            self.counters["checks_failed"] += 1
        runtime.notify(state, state.record_check(passed, time.time(), check.healthy_after, check.unhealthy_after))

    def statistics(self) -> dict[str, int]:
        return dict(self.counters)

    def __repr__(self) -> str:
        return f"HealthChecks({self.counters})"


def _resolve(alerts: Alerts) -> str | None:
    """The webhook URL (blocking for file: secrets; called off the loop)."""
    value = resolve_ref(alerts.webhook)
    if not value or not value.startswith(("https://", "http://")):
        where = alerts.webhook.source if isinstance(alerts.webhook, SecretRef) else "alerts.webhook"
        log.warning("alerts webhook %s is missing or not an http(s) URL; alerts are off", where)
        return None
    return value
