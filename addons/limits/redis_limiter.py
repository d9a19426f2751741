"""The limits of addons/limits/arithmetic.py, enforced atomically on Redis and shared by every sidekey.

API (async; the same checks, rules and Verdict as LocalLimiter, minus ``now``)::

    limiter = RedisLimiter.from_url("redis://127.0.0.1:6379/0", timeout=0.5)
    verdict = await limiter.acquire(checks, tokens)       # one EVALSHA, all rules all-or-nothing
    await limiter.refresh(checks, verdict.lease)         # a request outliving lease_ttl keeps its slot
    await limiter.release(checks, verdict.lease, token_delta=actual - estimate)   # one EVALSHA
    await limiter.reconcile(checks, token_delta)          # token rules only, no lease
    limiter.statistics(); await limiter.aclose()

Every call is one script call: EVALSHA (redis-py ``register_script`` loads the script again after
a NOSCRIPT, e.g. once after Redis restarts). The time is Redis's ``TIME``, read inside the script,
so the sidecars' clocks do not matter (Redis 7 replicates a script's effects, so a script may read
the time before writing). The Lua repeats the arithmetic module's integer arithmetic, exact below 2**53, and
returns each rule's level; ``arithmetic.judge`` turns those into the Verdict, so the two limiters
answer alike.

Keys: ``<prefix><scope>:<rule name>`` (the prefix is "sidekey:rl:"; rule names hold no ":").
    rates        a hash {level, at, span, ticks}; PEXPIRE at the moment the bucket is full again,
                 as a full bucket and no key mean the same.
    concurrency  a sorted set, lease id -> expiry (ms, Redis time). Each acquire purges expired
                 leases, so a sidekey that dies mid-request holds its slots for at most
                 ``lease_ttl``; a holder refreshes longer requests. PEXPIRE at the last lease's expiry.
    sidecars     ``<prefix>sidecars``, a sorted set, sidecar id -> its last acquire (ms, Redis
                 time). Each acquire script adds its sidecar, drops those older than a minute and
                 returns the count (``sidecars``): while Redis is out of reach, a sidecar takes
                 ``1/sidecars`` of each limit alone (addons/limits/addon.py). No extra round trip.

Errors: a connection failure, a timeout (``timeout`` bounds each whole call), a read-only replica
or an error reply (OOM under ``maxmemory``, NOPERM from an ACL, BUSY, ...: Redis is there but will
not count) raises LimiterUnavailable, with its reason (never the error's text) and the call's wall
time.
Failing open or closed is the caller's policy. The client reconnects on
its own on the next call. A call that timed out may still have run (it then counts against the
quota, and its lease expires): never an over-grant. A Redis restart forgets all counts.
Not handled: Redis Cluster (a check's keys would need one hash slot).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, NoScriptError, OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from addons.limits.arithmetic import Check, Verdict, cost_of, judge

PREFIX = "sidekey:rl:"
PRESENCE = "sidecars"  # <prefix>sidecars: a sorted set, sidecar id -> last acquire (ms, Redis time)
PRESENCE_MS = 60_000  # a sidecar counts as alive this long after its last acquire

# Shared by both scripts. Numbers go back to Redis through string.format('%.0f'): Lua's own
# number-to-string keeps 14 digits, too few for a microsecond timestamp.
_COMMON = """
local function int(n) return string.format('%.0f', n) end
local time = redis.call('TIME')
local sec, usec = tonumber(time[1]), tonumber(time[2])
local now_ms = sec * 1000 + math.floor(usec / 1000)
local lease, ttl = ARGV[1], tonumber(ARGV[2])

-- A rate's level drained to tick `now`, and the tick it is then true at.
local function drain(key, limit, ticks, span, now)
  local st = redis.call('HMGET', key, 'level', 'at', 'span', 'ticks')
  local level, at = tonumber(st[1]), tonumber(st[2])
  if not level then return 0, now end
  if tonumber(st[3]) ~= span then level = math.ceil(level * span / tonumber(st[3])) end
  if tonumber(st[4]) ~= ticks then at = math.floor(at * ticks / tonumber(st[4])) end
  if now > at then
    level = math.max(0, level - (now - at) * limit)
    at = now
  end
  return level, at
end

local function store(key, level, at, now, limit, ticks, span)
  if level <= 0 then
    redis.call('DEL', key)
    return
  end
  redis.call('HSET', key, 'level', int(level), 'at', int(at), 'span', int(span), 'ticks', int(ticks))
  redis.call('PEXPIRE', key, int(math.ceil((at - now + level / limit) * 1000 / ticks) + 1))
end

local function keep_until(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
"""

# KEYS: one per rule, then the presence set. ARGV: lease, lease ttl (ms), then five per rule:
# kind ('c' concurrency, 'r' rate), limit, ticks per second, span, level units to add; then
# this sidecar's id. Returns {allowed (1|0), level of each rule, sidecars seen in the last
# minute}: a rate's level drained to now, or a concurrency's live leases, both before this acquire.
ACQUIRE = (
    _COMMON
    + """
local rules = #KEYS - 1
local out, ats, nows = {1}, {}, {}
for i = 1, rules do
  local key = KEYS[i]
  local a = 3 + (i - 1) * 5
  local limit = tonumber(ARGV[a + 1])
  if ARGV[a] == 'c' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms)
    out[i + 1] = redis.call('ZCARD', key)
    if out[i + 1] >= limit then out[1] = 0 end
  else
    local ticks, span = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
    nows[i] = sec * ticks + math.floor(usec * ticks / 1000000)
    out[i + 1], ats[i] = drain(key, limit, ticks, span, nows[i])
    if out[i + 1] + tonumber(ARGV[a + 4]) > limit * span then out[1] = 0 end
  end
end
if out[1] == 1 then
  for i = 1, rules do
    local key = KEYS[i]
    local a = 3 + (i - 1) * 5
    if ARGV[a] == 'c' then
      redis.call('ZADD', key, now_ms + ttl, lease)
      keep_until(key, ttl)
    else
      local limit, ticks, span = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
      store(key, out[i + 1] + tonumber(ARGV[a + 4]), ats[i], nows[i], limit, ticks, span)
    end
  end
end
local presence = KEYS[rules + 1]
redis.call('ZADD', presence, now_ms, ARGV[#ARGV])
redis.call('ZREMRANGEBYSCORE', presence, '-inf', now_ms - 60000)  -- PRESENCE_MS
redis.call('PEXPIRE', presence, 120000)
out[rules + 2] = redis.call('ZCARD', presence)
return out
"""
)

# ARGV: lease, lease ttl (ms), then five per rule: op, limit, ticks, span, level units to add.
# op 'd': add to a rate's level (negative returns), clamped to [0, 2 * cap]: one window of debt
# at most; 'r': release the lease; 'f': refresh the lease if it is still live. Returns how many
# leases were released or refreshed.
SETTLE = (
    _COMMON
    + """
local done = 0
for i, key in ipairs(KEYS) do
  local a = 3 + (i - 1) * 5
  local op = ARGV[a]
  if op == 'r' then
    done = done + redis.call('ZREM', key, lease)
  elseif op == 'f' then
    local expiry = tonumber(redis.call('ZSCORE', key, lease))
    if expiry and expiry > now_ms then
      redis.call('ZADD', key, now_ms + ttl, lease)
      keep_until(key, ttl)
      done = done + 1
    end
  else
    local limit, ticks, span = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
    local now = sec * ticks + math.floor(usec * ticks / 1000000)
    local level, at = drain(key, limit, ticks, span, now)
    level = math.min(math.max(0, level + tonumber(ARGV[a + 4])), 2 * limit * span)
    store(key, level, at, now, limit, ticks, span)
  end
end
return done
"""
)


Settle = tuple[Sequence[Check], "str | None", int]  # (checks, lease, token delta) of a finished request


class LimiterUnavailable(Exception):
    """Redis did not count (down, unreachable, timed out, a read-only replica, or an error reply).
    ``reason`` is one of REASONS, ``elapsed`` the call's wall time in seconds; the message
    is made of these only. Fail open or closed is the caller's decision."""

    def __init__(self, reason: str, elapsed: float) -> None:
        super().__init__(f"redis unavailable ({reason})")
        self.reason = reason
        self.elapsed = elapsed


REASONS = ("timeout", "connection refused", "connection error", "read-only replica", "out of memory",
           "no permission", "error reply")  # fmt: skip
# An error reply (ResponseError) is Redis refusing to count, not a verdict: the policy's on_failure
# decides, as for an outage (it was a 502 addon_failed). NoScriptError is a ResponseError too, but
# never reaches here: the script is loaded and the call sent again first.
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ResponseError, OSError)


def _reason(exc: BaseException) -> str:
    """Which of REASONS ``exc`` is: by type, never by its text (it may hold the URL)."""
    if isinstance(exc, (TimeoutError, RedisTimeoutError)):  # asyncio.timeout raises TimeoutError
        return "timeout"
    if isinstance(exc, ReadOnlyError):
        return "read-only replica"
    if isinstance(exc, OutOfMemoryError):
        return "out of memory"
    if isinstance(exc, NoPermissionError):
        return "no permission"
    if isinstance(exc, ResponseError):
        return "error reply"
    seen: BaseException | None = exc
    for _ in range(4):  # redis-py raises its ConnectionError inside `except OSError`
        if seen is None:
            break
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        seen = seen.__cause__ or seen.__context__
    return "connection error"


class RedisLimiter:
    __slots__ = ("client", "prefix", "lease_ttl", "timeout", "_acquire", "_settle", "_presence",
                 "_allowed", "_refused", "_unavailable", "round_trips", "sidecar_id", "sidecars")  # fmt: skip

    def __init__(self, client: Redis, *, prefix: str = PREFIX, lease_ttl: float = 60.0, timeout: float = 1.0) -> None:
        if lease_ttl < 0.001 or timeout <= 0:
            raise ValueError("lease_ttl and timeout must be positive")
        self.client = client
        self.prefix = prefix
        self.lease_ttl = lease_ttl  # seconds a lease lives unless refreshed
        self.timeout = timeout  # seconds for a whole call, connection wait included
        self._acquire: AsyncScript = client.register_script(ACQUIRE)
        self._settle: AsyncScript = client.register_script(SETTLE)
        self._allowed = self._refused = self._unavailable = 0
        self.round_trips = 0  # network calls made (a pipeline is one)
        self.sidecar_id = secrets.token_hex(8)  # this process in the presence set
        self.sidecars = 1  # sidecars seen alive in the last minute, as of the last acquire
        self._presence = f"{prefix}{PRESENCE}"

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 0.5, max_connections: int = 32, **options: Any) -> RedisLimiter:
        """A client of its own (``proxy.redis_client.connect``: a bounded pool, connect and read
        timeouts, no retries: a retried acquire could count twice)."""
        from proxy.redis_client import connect

        return cls(connect(url, timeout, max_connections), timeout=timeout, **options)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def acquire(
        self, checks: Sequence[Check], tokens: int, lease: str | None = None, settles: Sequence[Settle] = ()
    ) -> Verdict:
        """Take from every rule or from none. ``lease`` names the concurrency slots (made up when
        None); the Verdict carries it, for refresh and release. ``settles``: finished requests'
        releases, sent in the same pipeline (no round trip of their own)."""
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        concurrent = any(rule.kind == "concurrent" for _, rule in checks)
        if concurrent and lease is None:
            lease = secrets.token_hex(8)
        args: list[str | int] = [lease or "", int(self.lease_ttl * 1000)]
        for _, rule in checks:
            if rule.kind == "concurrent":
                args += ("c", rule.limit, 0, 0, 0)
            else:
                args += ("r", rule.limit, rule.ticks, rule.span, cost_of(rule, tokens))
        args.append(self.sidecar_id)
        keys = [*_keys(self.prefix, checks), self._presence]
        if settles:
            calls = [c for item in settles if (c := self._settle_call(item[0], item[1], item[2], "r"))]
            settled = [(self._settle, _keys(self.prefix, c[0]), c[1]) for c in calls]
            replies = await self._pipeline([*settled, (self._acquire, keys, args)])
            reply = self._answer(replies[-1])  # a refused settle is dropped (its lease expires)
        else:
            reply = await self._call(self._acquire, keys, args)
        self.sidecars = max(1, int(reply[-1]))
        verdict = judge(checks, reply[1:-1], tokens, lease if concurrent else None)
        if verdict.allowed != (reply[0] == 1):  # the script and judge() run the same integer arithmetic
            raise RuntimeError("rate limit script and judge() disagree")
        if verdict.allowed:
            self._allowed += 1
        else:
            self._refused += 1
        return verdict

    async def reconcile(self, checks: Sequence[Check], token_delta: int) -> None:
        """Correct the token rules by ``actual - reserved`` (negative returns tokens)."""
        await self._finish(checks, None, token_delta, "d")

    async def release(self, checks: Sequence[Check], lease: str | None, token_delta: int = 0) -> None:
        """Return an allowed acquire's concurrency slots, reconciling tokens in the same call."""
        await self._finish(checks, lease, token_delta, "r")

    async def refresh(self, checks: Sequence[Check], lease: str) -> int:
        """Extend the lease by ``lease_ttl``; returns how many slots were still held (an expired
        lease is not revived: its slot may be someone else's by now)."""
        return await self._finish(checks, lease, 0, "f")

    async def _finish(self, checks: Sequence[Check], lease: str | None, token_delta: int, op: str) -> int:
        call = self._settle_call(checks, lease, token_delta, op)
        if call is None:
            return 0
        return int(await self._call(self._settle, _keys(self.prefix, call[0]), call[1]))

    async def release_many(self, items: Sequence[Settle]) -> None:
        """Release and reconcile many finished requests in one pipelined round trip."""
        calls = [c for checks, lease, delta in items if (c := self._settle_call(checks, lease, delta, "r"))]
        if calls:
            for reply in await self._pipeline([(self._settle, _keys(self.prefix, c[0]), c[1]) for c in calls]):
                self._answer(reply)

    async def _pipeline(self, calls: Sequence[tuple[AsyncScript, list[str], list[str | int]]]) -> list[Any]:
        """Several script calls in one round trip. EVALSHA by hand: redis-py's
        pipelined scripts ask SCRIPT EXISTS first (a round trip each time).
        A NOSCRIPT (Redis restarted, or a script not yet used there) fails that
        call only, the others ran: the failed ones alone are sent again once
        the scripts are loaded. Sending all again would count an acquire twice.
        A call Redis refused comes back as its ResponseError (``_answer``)."""
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        start = time.monotonic()
        for attempt in (1, 2):
            try:
                async with asyncio.timeout(self.timeout):
                    self.round_trips += 1
                    async with self.client.pipeline(transaction=False) as pipe:
                        for i in todo:
                            script, keys, args = calls[i]
                            pipe.evalsha(script.sha, len(keys), *keys, *args)
                        got = await pipe.execute(raise_on_error=False)
                    for i, reply in zip(todo, got, strict=True):
                        replies[i] = reply
                    todo = [i for i in todo if isinstance(replies[i], NoScriptError)]
                    if not todo:
                        break
                    if attempt == 2:
                        raise replies[todo[0]]
                    async with asyncio.timeout(self.timeout):
                        for script in {id(calls[i][0]): calls[i][0] for i in todo}.values():
                            await self.client.script_load(script.script)
            except _UNAVAILABLE as exc:
                self._unavailable += 1
                raise LimiterUnavailable(_reason(exc), time.monotonic() - start) from exc
        return replies

    def _answer(self, reply: Any) -> Any:
        """One pipelined call's reply; an error reply raises LimiterUnavailable."""
        if isinstance(reply, ResponseError):  # OOM, NOPERM, BUSY, ...: Redis is there but will not count
            self._unavailable += 1
            raise LimiterUnavailable(_reason(reply), 0.0) from reply
        if isinstance(reply, Exception):
            raise reply
        return reply

    def _settle_call(
        self, checks: Sequence[Check], lease: str | None, token_delta: int, op: str
    ) -> tuple[list[Check], list[str | int]] | None:
        picked: list[Check] = []
        args: list[str | int] = [lease or "", int(self.lease_ttl * 1000)]
        for check in checks:
            rule = check[1]
            if rule.kind == "concurrent":
                if op == "d" or lease is None:
                    continue
                args += (op, rule.limit, 0, 0, 0)
            elif rule.kind == "tokens" and token_delta and op != "f":
                args += ("d", rule.limit, rule.ticks, rule.span, token_delta * rule.span)
            else:
                continue
            picked.append(check)
        return (picked, args) if picked else None

    async def _call(self, script: AsyncScript, keys: list[str], args: list[str | int]) -> Any:
        start = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                self.round_trips += 1
                return await script(keys=keys, args=args)
        except _UNAVAILABLE as exc:  # builtin TimeoutError (asyncio.timeout) is an OSError
            self._unavailable += 1
            raise LimiterUnavailable(_reason(exc), time.monotonic() - start) from exc

    def statistics(self) -> dict[str, int]:
        return {"allowed": self._allowed, "refused": self._refused, "unavailable": self._unavailable,
                "round_trips": self.round_trips}  # fmt: skip

    def __repr__(self) -> str:  # never the URL: it may carry a password
        return (f"RedisLimiter(prefix={self.prefix!r}, allowed={self._allowed}, refused={self._refused}, "
                f"unavailable={self._unavailable})")  # fmt: skip


def _keys(prefix: str, checks: Sequence[Check]) -> list[str]:
    return [f"{prefix}{scope}:{rule.name}" for scope, rule in checks]
