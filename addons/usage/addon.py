"""Usage and cost: requests, tokens (input, output, cached, reasoning, cache
writes) and USD per provider, model, upstream and caller, per UTC day in
``addons.usage.ledger`` (shared through Redis when the policy has ``redis``), and
spend budgets per provider and per caller.

``request``: when the provider's ``budget`` (or the caller's ``caller_budget``)
is spent for the UTC day or month: 429 ``budget_exceeded``, Retry-After until
it resets. An LLM-looking POST (its JSON names a model or messages) offering
br or zstd is cut to gzip and deflate, so the answer stays readable.

``responseheaders``: a 2xx JSON or SSE answer to a POST gets a
``flow.body_observer`` (``addons.usage.answers``) keeping JSON up to 4 MiB or feeding an SSEUsageMeter.

``response`` / ``error``: the reported usage (of a JSON answer only its
``usage`` object is parsed), else an estimate marked as such (a stream without
usage: its text plus the request's prompt estimate). The request is parsed
only then, once, into ``flow.metadata["estimate"]`` (or the limits addon's is
reused). Sets ``flow.metadata`` ``usage``, ``cost`` (None: unpriced) and
``priced_model`` (the price table's name: a bounded metric label), and
records under the provider that served. Local answers (budgets, limits) are
not counted; failures count with zero tokens unless part of an answer came.
An answer of the response cache is recorded by the cache (``record_cached``)
as ``cached`` with the cost it saved: never a request, never spend.

A background task flushes to Redis about once a second and reads the fleet's
totals back every few seconds. Budgets see finished requests only: concurrent
requests may overshoot a cap by what is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from addons.usage.answers import MODEL_AT, InflatingSSE, JSONBody, json_usage, looks_llm, unreadable, wire_of
from addons.usage.ledger import COST, COUNTERS, Counts, Ledger, over_budget, parse_since, previous_month_start
from addons.usage.prices import SHIPPED, PriceTable
from addons.usage.redis_ledger import RedisLedger
from addons.usage.stream import SSEUsageMeter
from addons.usage.tokens import RequestEstimate, Usage, estimate_request, usage_from_json
from proxy.capabilities import CACHED_USAGE, SESSION_USAGE, USAGE_REPORT
from proxy.errors import ProxyError
from proxy.flow import Flow, ObserverTee, Response
from proxy.policy import Policy, Provider

if TYPE_CHECKING:
    from proxy.runtime import Runtime

log = logging.getLogger("sidekey.usage")

FLUSH_EVERY = 1.0  # seconds between flushes to Redis
REFRESH_EVERY = 2.0  # today and yesterday are read back from Redis this often
FULL_REFRESH_EVERY = 300.0  # and every day since the start of last month this often
LABELS_MAX = 1024
_READABLE = frozenset({"gzip", "x-gzip", "deflate", "identity"})
_VIEW = ("requests", "input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens",
         "cache_creation_tokens", "estimated", "unpriced", "cost_usd", "cached", "saved_usd")  # fmt: skip


class BudgetExceeded(ProxyError):
    status, code, retryable = 429, "budget_exceeded", True
    template = "the {scope} budget of provider {provider} is spent; retry in {seconds} s"


class UsageMeter:
    name = "usage"
    provides = (USAGE_REPORT, SESSION_USAGE, CACHED_USAGE)

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        ledger: Ledger | None = None,
    ) -> None:
        self.clock = clock  # wall time: days and months are UTC calendar periods
        self.sleep = sleep
        self.ledger = ledger or Ledger()
        self.table = PriceTable()
        self.runtime: Runtime | None = None
        self.store: RedisLedger | None = None
        self.counters = {"recorded": 0, "estimated": 0, "refused": 0, "redis_errors": 0}
        self._names: list[str] = []  # price table names, longest first
        self._labels: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None
        self._full_due = self._recent_due = 0.0
        self._loaded = False
        self._redis_down = False

    def setup(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def configure(self, policy: Policy) -> None:
        self.table = PriceTable(dict(policy.prices))
        names = {k.lower() for k in SHIPPED} | {k.strip().lower() for k, _ in policy.prices}
        self._names, self._labels = sorted(names, key=len, reverse=True), {}
        client = self.runtime.redis if self.runtime is not None else None
        if client is None:
            self.store, self.ledger.persist = None, False
            self.ledger.pending.clear()
        elif self.store is None or self.store.client is not client:
            timeout = policy.redis.timeout if policy.redis is not None else 0.5
            self.store = RedisLedger(self.ledger, client, timeout=timeout)
            self.ledger.persist, self._loaded = True, False

    async def running(self) -> None:
        if self.store is not None:
            await self.sync()  # budgets start from the fleet's spend, not zero
        self._task = asyncio.create_task(self._loop(), name="sidekey-usage")

    async def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.store is not None:
            await self.sync(load=False)

    # -- hooks ------------------------------------------------------------------------
    def request(self, flow: Flow) -> None:
        provider = flow.provider
        if provider is None:
            return
        if (provider.budget is not None or provider.caller_budget is not None) and self._refuse(flow, provider):
            return
        req = flow.request
        if req.method != "POST":
            return
        accept = req.headers.get("accept-encoding")
        if accept is not None and ("br" in accept or "zstd" in accept) and looks_llm(req.body):
            kept = [t.strip() for t in accept.split(",") if t.split(";")[0].strip().lower() in _READABLE]
            req.headers["accept-encoding"] = ", ".join(kept) or "identity"

    def responseheaders(self, flow: Flow) -> None:
        resp = flow.response
        if flow.provider is None or resp is None or not 200 <= resp.status < 300:
            return
        if flow.request.method != "POST":
            return  # not an LLM call: a model list, a health probe
        kind = resp.headers.get("content-type", "")
        sse = kind.startswith("text/event-stream")
        if not sse and "json" not in kind:
            return
        encoding = resp.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in _READABLE:
            flow.body_observer = unreadable
        elif sse:
            meter = SSEUsageMeter(wire_of(flow.request.path))
            flow.body_observer = meter.feed if encoding == "identity" else InflatingSSE(meter)
        else:
            flow.body_observer = JSONBody(encoding != "identity")

    def response(self, flow: Flow) -> None:
        self._settle(flow)

    def error(self, flow: Flow) -> None:
        self._settle(flow)

    def record_usage(self, flow: Flow, usage: Usage) -> float | None:
        """One response of a session (a WebSocket's response.done), as a request of its own."""
        provider, state = flow.provider, flow.upstream_state
        if provider is None:
            return None
        served, upstream = (state.provider, state.name) if state is not None else (provider.name, "-")
        cost = self.table.cost(usage) if usage.input or usage.output else 0.0
        self.counters["recorded"] += 1
        self.ledger.record(self.clock(), (served, usage.model or "unknown", upstream, flow.caller), usage, cost)
        return cost

    def record_cached(self, flow: Flow, saved_usd: float) -> None:
        """A request the response cache answered: a ``cached`` row (upstream ``cache``)."""
        provider = flow.provider
        if provider is not None:
            model = self._model_of(flow) or "unknown"
            self.ledger.record_cached(self.clock(), (provider.name, model, "cache", flow.caller), saved_usd)
            self.counters["recorded"] += 1

    # -- internals --------------------------------------------------------------------
    def _refuse(self, flow: Flow, provider: Provider) -> bool:
        now = self.clock()
        for budget, caller in ((provider.budget, None), (provider.caller_budget, flow.caller)):
            if budget is None:
                continue
            day, month = self.ledger.spend(now, provider.name, caller)
            verdict = over_budget(budget, day, month, now)
            if verdict is not None:
                scope, seconds = verdict
                self.counters["refused"] += 1
                err = BudgetExceeded(provider.name, scope=scope if caller is None else f"per-caller {scope}",
                                     seconds=seconds)  # fmt: skip
                flow.response = Response.from_error(err)
                return True
        return False

    def _settle(self, flow: Flow) -> None:
        provider = flow.provider
        state = flow.upstream_state
        if provider is None or (state is None and flow.error is None):
            return  # unmatched, or answered by sidekey itself: nothing went upstream
        served, upstream = (state.provider, state.name) if state is not None else (provider.name, "-")
        meta = flow.metadata
        observer = flow.body_observer
        if observer is None and not (meta and "estimate" in meta) and not looks_llm(flow.request.body):
            self.ledger.record(self.clock(), (served, "unknown", upstream, flow.caller), _ZERO, 0.0)
            self.counters["recorded"] += 1
            return  # not an LLM call: one request, no tokens, no metadata (the observers' fast path)
        usage = self._measure(flow, observer)
        if usage.model is None:
            estimate = meta.get("estimate")
            model = estimate.model if estimate is not None else self._model_of(flow)
            if model:
                usage = dataclasses.replace(usage, model=model)
        cost: float | None = 0.0
        if usage.input or usage.output:
            cost = self.table.cost(usage)
            if cost is not None and usage.model:
                meta["priced_model"] = self._label(usage.model)
        meta["usage"], meta["cost"] = usage, cost
        self.counters["recorded"] += 1
        self.counters["estimated"] += usage.estimated
        self.ledger.record(self.clock(), (served, usage.model or "unknown", upstream, flow.caller), usage, cost)

    def _measure(self, flow: Flow, observer: Callable[[bytes], None] | None) -> Usage:
        if isinstance(observer, ObserverTee):  # the cache's recorder: ours is inside
            observer = observer.inner
        reader = getattr(observer, "__self__", observer)
        if isinstance(reader, InflatingSSE):
            reader = reader.meter
        if isinstance(reader, SSEUsageMeter):
            if flow.error is not None and not reader.statistics()["bytes"]:
                return _ZERO  # failed before anything was streamed
            return reader.finish(None if reader.reported else self._estimate(flow))
        if isinstance(reader, JSONBody):
            if flow.error is not None and not reader.size:
                return _ZERO
            body = reader.body()
            if body is None:
                return self._guess(flow)  # too big or undecodable: the prompt estimate stands in
            wire = wire_of(flow.request.path)
            found = json_usage(body, wire)
            if found is None and b'"usage"' in body:  # an odd layout: the whole answer, once
                found = usage_from_json(body, wire)
            if found is not None:
                return found
            return self._guess(flow) if flow.error is not None else _ZERO  # a cut answer was billed
        if observer is unreadable:
            return self._guess(flow)
        return _ZERO  # an error status, not JSON or SSE, or failed before an answer

    def _estimate(self, flow: Flow) -> RequestEstimate | None:
        """The request's estimate: the limits addon's, else made now (once) from the body."""
        estimate: RequestEstimate | None = flow.metadata.get("estimate")
        body = flow.request.body
        if estimate is None and type(body) is bytes and looks_llm(body):
            estimate = flow.metadata["estimate"] = estimate_request(body, wire_of(flow.request.path))
        return estimate

    def _guess(self, flow: Flow) -> Usage:
        estimate = self._estimate(flow)
        return Usage(estimate.prompt_tokens, 0, estimated=True) if estimate is not None else _ZERO

    @staticmethod
    def _model_of(flow: Flow) -> str | None:
        body = flow.request.body
        found = MODEL_AT.search(body) if type(body) is bytes else None
        return found.group(1)[1:-1].decode("utf-8", "replace") if found else None

    def _label(self, model: str) -> str:
        """The price table's name for a priced model (gpt-4o for gpt-4o-2024-08-06): a bounded label."""
        name = model.strip().lower()
        label = self._labels.get(name)
        if label is None:
            price = self.table.lookup(name)
            label = next((k for k in self._names if name.startswith(k) and self.table.lookup(k) is price), "other")
            if len(self._labels) >= LABELS_MAX:
                self._labels.clear()
            self._labels[name] = label
        return label

    async def _loop(self) -> None:
        while True:
            await self.sleep(FLUSH_EVERY)
            await self.sync()

    async def sync(self, *, load: bool = True) -> None:
        """Flush pending counts to Redis, then read the shared days back when due.
        Errors are logged by type (a Redis error may quote the URL) and retried next time."""
        store = self.store
        if store is None:
            return
        try:
            await store.flush()
            if load and store.clean:
                mono, now = time.monotonic(), self.clock()
                if not self._loaded or mono >= self._full_due:
                    await store.load_all(now)
                    self._loaded, self._full_due = True, mono + FULL_REFRESH_EVERY
                    self._recent_due = mono + REFRESH_EVERY
                elif mono >= self._recent_due:
                    await store.load_recent(now)
                    self._recent_due = mono + REFRESH_EVERY
        except Exception as exc:  # noqa: BLE001 - Redis down: keep counting here, retry next tick
            self.counters["redis_errors"] += 1
            if not self._redis_down:
                log.error("usage: redis unreachable (%s); counting locally until it is back", type(exc).__name__)
            self._redis_down = True
            return
        if self._redis_down:
            log.warning("usage: redis reachable again; usage is shared")
            self._redis_down = False

    def usage_report(self, provider: str | None = None, since: str | None = None) -> dict[str, Any]:
        """What ``GET /usage`` answers. ``since``: YYYY-MM-DD, RFC 3339 or unix seconds, counted
        from the start of its UTC day (default: the start of last month). Raises ValueError."""
        day = parse_since(since) if since is not None else previous_month_start(self.clock())
        totals: Counts = [0] * len(COUNTERS)
        by = []
        for key, counts in sorted(self.ledger.query(day, provider).items()):
            for i, n in enumerate(counts):
                totals[i] += n
            by.append({"provider": key[0], "model": key[1], "upstream": key[2], "caller": key[3], **_view(counts)})
        return {"shared": self.store is not None, "since": day, "totals": _view(totals), "by": by}

    def statistics(self) -> dict[str, Any]:
        return {**self.counters, "ledger": self.ledger.statistics(), "prices": self.table.statistics(),
                "redis": self.store.statistics() if self.store is not None else None}  # fmt: skip

    def __repr__(self) -> str:
        return f"UsageMeter({self.ledger!r}, {self.table!r}, shared={self.store is not None})"


_ZERO = Usage(0, 0)


def _view(counts: Counts) -> dict[str, int | float]:
    out: dict[str, int | float] = {name: int(n) for name, n in zip(_VIEW, counts, strict=True)}
    out["cost_usd"] = round(counts[COST], 9)
    out["saved_usd"] = round(counts[COST + 2], 9)
    return out
