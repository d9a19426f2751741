"""The usage ledger: requests, tokens and cost per UTC day and (provider,
model, upstream, caller), the spend budgets are checked against, and its
copy in Redis shared by every sidecar.

The core (:class:`Ledger`) is pure: ``now`` is passed in, nothing waits.
``record`` adds to the day's bucket (what ``/usage`` and budgets read) and,
when Redis backs the ledger, to ``pending``. :class:`RedisLedger` moves
pending increments to Redis (``addons.usage.redis_ledger``) in one script call about once a second (so a
request makes no Redis round trip for usage) and reads every sidecar's days
back: a day read from Redis replaces the local one, plus what is still
pending here.

Bounded: at most ``max_keys`` keys a day; past that a new caller folds into
``other``, past ``max_keys + SLACK`` its model too, and past ``max_keys + 2 *
SLACK`` everything new lands in one ``other`` key. Names longer than ``MAX_NAME`` are cut. Days
older than ``keep_days`` are dropped (enough for this month and the last).
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from addons.usage.tokens import Usage
from proxy.policy import Budget

if TYPE_CHECKING:
    pass

# ``cached``: requests answered by the response cache (addons/cache: a hit or a coalesced follower);
# they went nowhere, so they are not ``requests`` and cost nothing; ``saved_usd`` is what they would have.
COUNTERS = ("requests", "input", "output", "cached_input", "reasoning", "cache_creation", "estimated", "unpriced",
            "cost_usd", "cached", "saved_usd")  # fmt: skip
FLOATS = frozenset({"cost_usd", "saved_usd"})
COST = COUNTERS.index("cost_usd")
CACHED = COUNTERS.index("cached")
OTHER = "other"
MAX_KEYS = 10_000  # distinct (provider, model, upstream, caller) a day
SLACK = 1_000  # keys past MAX_KEYS per fold level (caller, then model)
KEEP_DAYS = 62  # this month and the last, whatever the day of the month
MAX_NAME = 128
DAY = 86_400

Key = tuple[str, str, str, str]  # provider, model, upstream, caller
Counts = list[float]  # indexed as COUNTERS; all but cost_usd hold ints
Bucket = dict[Key, Counts]

_DAY_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_UNIX_RE = re.compile(r"[0-9]{1,11}(?:\.[0-9]{1,9})?")
_LEAP = re.compile(r"(T[0-9]{2}:[0-9]{2}):60")


def day_of(now: float) -> str:
    return datetime.datetime.fromtimestamp(now, datetime.UTC).date().isoformat()  # zero-padded, unlike %Y


def month_start(now: float) -> datetime.date:
    return datetime.datetime.fromtimestamp(now, datetime.UTC).date().replace(day=1)


def next_month(now: float) -> float:
    """Unix time the UTC month after ``now`` starts."""
    first = month_start(now)
    nxt = first.replace(year=first.year + 1, month=1) if first.month == 12 else first.replace(month=first.month + 1)
    return datetime.datetime(nxt.year, nxt.month, 1, tzinfo=datetime.UTC).timestamp()


def previous_month_start(now: float) -> str:
    first = month_start(now)
    prev = first.replace(year=first.year - 1, month=12) if first.month == 1 else first.replace(month=first.month - 1)
    return prev.isoformat()


def parse_since(text: str) -> str:
    """``YYYY-MM-DD``, RFC 3339 (with an offset or Z) or unix seconds -> its UTC day.
    Raises ValueError, with a message that does not quote the input."""
    text = text.strip()
    try:
        if _DAY_RE.fullmatch(text):
            return datetime.date.fromisoformat(text).isoformat()
        if _UNIX_RE.fullmatch(text):
            return day_of(float(text))
        if "T" in text.upper() and len(text) <= 64:
            # RFC 3339 §5.6 allows a leap second (:60) that Python's parser does not
            moment = datetime.datetime.fromisoformat(_LEAP.sub(r"\1:59", text.upper().replace("Z", "+00:00")))
            if moment.tzinfo is not None:
                try:
                    return moment.astimezone(datetime.UTC).date().isoformat()
                except OverflowError:  # past year 1 or 9999 once moved to UTC
                    return "0001-01-01" if moment.year == 1 else "9999-12-31"
    except (ValueError, OverflowError, OSError):
        pass
    raise ValueError("since: expected YYYY-MM-DD, an RFC 3339 time with an offset, or unix seconds")


def over_budget(budget: Budget, day_usd: float, month_usd: float, now: float) -> tuple[str, int] | None:
    """(scope, seconds until it resets) when a cap is reached, else None. A spent
    month outlasts a spent day, so it is named first."""
    if budget.monthly_usd is not None and month_usd >= budget.monthly_usd:
        return "monthly", max(1, math.ceil(next_month(now) - now))
    if budget.daily_usd is not None and day_usd >= budget.daily_usd:
        return "daily", max(1, math.ceil(DAY - now % DAY))
    return None


def _bump(counts: Counts, usage: Usage, unpriced: object, cost: float | None) -> None:
    counts[0] += 1
    counts[1] += usage.input
    counts[2] += usage.output
    counts[3] += usage.cached_input
    counts[4] += usage.reasoning
    counts[5] += usage.cache_creation
    counts[6] += usage.estimated
    counts[7] += bool(unpriced)
    counts[8] += cost or 0.0


def _new() -> Counts:
    return [0.0 if name in FLOATS else 0 for name in COUNTERS]


def _name(value: str) -> str:
    return value if len(value) <= MAX_NAME else value[:MAX_NAME]


class Ledger:
    __slots__ = ("max_keys", "keep_days", "persist", "days", "pending", "_spend", "_before", "_today", "_end",
                 "counters")  # fmt: skip

    def __init__(self, *, max_keys: int = MAX_KEYS, keep_days: int = KEEP_DAYS) -> None:
        self.max_keys = max_keys
        self.keep_days = keep_days
        self.persist = False  # Redis backs it: keep what is not flushed yet in ``pending``
        self.days: dict[str, Bucket] = {}
        self.pending: dict[str, Bucket] = {}
        # day -> (provider, caller or None for the whole provider) -> USD: budgets read one lookup
        self._spend: dict[str, dict[tuple[str, str | None], float]] = {}
        self._before: dict[tuple[str, str, str | None], float] = {}  # spend earlier in the month, memoised
        self._today, self._end = "", 0.0
        self.counters = {"records": 0, "folded": 0, "loaded_days": 0}

    def _day(self, now: float) -> str:
        if not (self._end - DAY <= now < self._end):
            self._today, self._end = day_of(now), now - now % DAY + DAY
            self._before.clear()
            cutoff = day_of(now - self.keep_days * DAY)
            for old in [d for d in self.days if d < cutoff]:
                del self.days[old]
                self._spend.pop(old, None)
            for old in [d for d in self.pending if d < cutoff]:
                del self.pending[old]
        return self._today

    def _fold(self, bucket: Bucket, key: Key) -> Key:
        n = len(bucket)
        if key in bucket or n < self.max_keys:
            return key
        self.counters["folded"] += 1
        provider, model, upstream, _caller = key
        for level, folded in enumerate(((provider, model, upstream, OTHER), (provider, OTHER, upstream, OTHER)), 1):
            if folded in bucket or n < self.max_keys + level * SLACK:
                return folded
        return (OTHER, OTHER, OTHER, OTHER)

    def record(self, now: float, key: Key, usage: Usage, cost: float | None) -> None:
        """One finished request. ``cost`` None: its model has no price (counted as unpriced
        when it used tokens)."""
        day = self._today if self._end - DAY <= now < self._end else self._day(now)
        bucket = self.days.get(day)
        if bucket is None:
            bucket = self.days[day] = {}
        counts = bucket.get(key)
        if counts is None:
            if len(key[1]) > MAX_NAME or len(key[3]) > MAX_NAME:
                key = (key[0], _name(key[1]), key[2], _name(key[3]))
            key = self._fold(bucket, key)
            counts = bucket.get(key) or bucket.setdefault(key, _new())
        unpriced = cost is None and (usage.input or usage.output)
        _bump(counts, usage, unpriced, cost)
        if self.persist:
            pend = self.pending.get(day)
            if pend is None:
                pend = self.pending[day] = {}
            _bump(pend.get(key) or pend.setdefault(key, _new()), usage, unpriced, cost)
        if cost:
            spend = self._spend.get(day)
            if spend is None:
                spend = self._spend[day] = {}
            for who in ((key[0], None), (key[0], key[3])):
                spend[who] = spend.get(who, 0.0) + cost
        self.counters["records"] += 1

    def record_cached(self, now: float, key: Key, saved_usd: float) -> None:
        """One request the response cache answered: counted as ``cached`` with what it saved,
        never as a request and never as spend (budgets do not see it)."""
        day = self._day(now)
        buckets = [self.days.setdefault(day, {})]
        if self.persist:
            buckets.append(self.pending.setdefault(day, {}))
        if len(key[1]) > MAX_NAME or len(key[3]) > MAX_NAME:
            key = (key[0], _name(key[1]), key[2], _name(key[3]))
        for bucket in buckets:
            counts = bucket.get(key) or bucket.setdefault(self._fold(bucket, key), _new())
            counts[CACHED] += 1
            counts[CACHED + 1] += saved_usd
        self.counters["records"] += 1

    def spend(self, now: float, provider: str, caller: str | None = None) -> tuple[float, float]:
        """USD spent today and this month (UTC) by ``provider``, or by one caller of it."""
        day = self._day(now)
        today = self._spend.get(day, {}).get((provider, caller), 0.0)
        memo = (day, provider, caller)
        before = self._before.get(memo)
        if before is None:
            month = day[:8]
            before = sum(s.get((provider, caller), 0.0) for d, s in self._spend.items() if d < day and
                         d.startswith(month))  # fmt: skip
            if len(self._before) >= 4096:  # callers come from requests: bounded
                self._before.clear()
            self._before[memo] = before
        return today, before + today

    def query(self, since: str, provider: str | None = None) -> dict[Key, Counts]:
        """Counters summed over the days from ``since`` (a UTC day) on."""
        out: dict[Key, Counts] = {}
        for day, bucket in self.days.items():
            if day < since:
                continue
            for key, counts in bucket.items():
                if provider is not None and key[0] != provider:
                    continue
                _add(out, key, counts)
        return out

    def take_pending(self) -> dict[str, Bucket]:
        pending, self.pending = self.pending, {}
        return pending

    def replace_day(self, day: str, snapshot: Mapping[Key, Counts]) -> None:
        """``snapshot`` (every sidecar's flushed counts, read from Redis) becomes the
        day, plus what this process has not flushed yet."""
        bucket: Bucket = {}
        for source in (snapshot, self.pending.get(day, {})):
            for key, counts in source.items():
                _add(bucket, self._fold(bucket, key), counts)
        self.days[day] = bucket
        spend: dict[tuple[str, str | None], float] = {}
        for (provider, _m, _u, caller), counts in bucket.items():
            if counts[COST]:
                for who in ((provider, None), (provider, caller)):
                    spend[who] = spend.get(who, 0.0) + counts[COST]
        self._spend[day] = spend
        self._before.clear()
        self.counters["loaded_days"] += 1

    def statistics(self) -> dict[str, int]:
        return {**self.counters, "days": len(self.days), "keys": sum(map(len, self.days.values())),
                "pending_keys": sum(map(len, self.pending.values()))}  # fmt: skip

    def __repr__(self) -> str:
        return f"Ledger(days={len(self.days)}, today={self._today or '-'}, persist={self.persist})"


def _add(into: dict[Key, Counts], key: Key, counts: Sequence[float]) -> None:
    """Sum ``counts`` into ``into[key]`` (a copy when the key is new: never alias a caller's list)."""
    acc = into.get(key)
    if acc is None:
        into[key] = list(counts)
    else:
        for i, n in enumerate(counts):
            acc[i] += n
