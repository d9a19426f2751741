"""The ledger's copy in Redis, shared by every sidecar: :class:`RedisLedger` flushes a
:class:`~addons.usage.ledger.Ledger`'s pending increments in one script call and reads
the shared days back.

Redis layout: a hash per day ``sidekey:usage:<YYYY-MM-DD>`` (EXPIRE 400 days),
fields ``<provider>|<model>|<upstream>|<caller>|<counter>`` with ``%`` and
``|`` in names percent-encoded so a name cannot forge a field. A flush is
idempotent: the script first sets a marker for the batch id (SET NX), so a
batch retried after a timeout that Redis had in fact applied is not counted
twice.
"""

from __future__ import annotations

import asyncio
import datetime
import math
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from addons.usage.ledger import COUNTERS, DAY, FLOATS, Bucket, Key, Ledger, day_of, previous_month_start

if TYPE_CHECKING:
    from redis.asyncio import Redis

PREFIX = "sidekey:usage:"
BATCH_PREFIX = "sidekey:usage-batch:"
EXPIRE_DAYS = 400
BATCH_TTL = 86_400  # a batch id is remembered this long: retries come within seconds

# KEYS[1]: the batch marker; KEYS[2..]: day hashes. ARGV[1]: marker ttl, ARGV[2]: hash ttl, then for
# each hash the number of field/value pairs and the pairs. "|cost_usd" and "|saved_usd" fields are floats.
_FLUSH = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
local i = 3
for k = 2, #KEYS do
  local n = tonumber(ARGV[i])
  i = i + 1
  for _ = 1, n do
    if string.sub(ARGV[i], -9) == '|cost_usd' or string.sub(ARGV[i], -10) == '|saved_usd' then
      redis.call('HINCRBYFLOAT', KEYS[k], ARGV[i], ARGV[i + 1])
    else
      redis.call('HINCRBY', KEYS[k], ARGV[i], ARGV[i + 1])
    end
    i = i + 2
  end
  redis.call('EXPIRE', KEYS[k], ARGV[2])
end
return 1
"""


def _escape(name: str) -> str:
    return name.replace("%", "%25").replace("|", "%7C") if ("%" in name or "|" in name) else name


def _unescape(name: str) -> str:
    return name.replace("%7C", "|").replace("%25", "%") if "%" in name else name


def encode_field(key: Key, counter: str) -> str:
    return "|".join((*map(_escape, key), counter))


def decode_day(raw: Mapping[Any, Any]) -> Bucket:
    """A day hash as HGETALL returns it (bytes or str); unknown or bad fields are skipped."""
    bucket: Bucket = {}
    for f, v in raw.items():
        field = f.decode("utf-8", "replace") if isinstance(f, bytes) else str(f)
        parts = field.split("|")
        if len(parts) != 5 or parts[4] not in COUNTERS:
            continue
        try:
            value = float(v) if parts[4] in FLOATS else int(v)
        except ValueError:
            continue
        if not (math.isfinite(value) and value >= 0):
            continue
        key: Key = (_unescape(parts[0]), _unescape(parts[1]), _unescape(parts[2]), _unescape(parts[3]))
        counts = bucket.get(key)
        if counts is None:
            counts = bucket[key] = [0] * len(COUNTERS)
        counts[COUNTERS.index(parts[4])] += value
    return bucket


def flush_args(batch: Mapping[str, Bucket]) -> tuple[list[str], list[str | int | float]]:
    """(day hash names, ARGV after the two ttls) for the flush script; zero counters are left out."""
    keys: list[str] = []
    argv: list[str | int | float] = []
    for day, bucket in sorted(batch.items()):
        pairs: list[str | int | float] = []
        for key, counts in bucket.items():
            for name, n in zip(COUNTERS, counts, strict=True):
                if n:
                    pairs += (encode_field(key, name), repr(float(n)) if name in FLOATS else int(n))
        if pairs:
            keys.append(PREFIX + day)
            argv += (len(pairs) // 2, *pairs)
    return keys, argv


class RedisLedger:
    """Flushes a Ledger's pending increments to Redis and loads the shared days back.
    Every call is bounded by ``timeout``; failures raise (the caller logs and retries)."""

    __slots__ = ("ledger", "client", "timeout", "_script", "_unsent", "counters")

    def __init__(self, ledger: Ledger, client: Redis, *, timeout: float = 0.5) -> None:
        self.ledger = ledger
        self.client = client
        self.timeout = timeout
        self._script = client.register_script(_FLUSH)
        self._unsent: tuple[str, dict[str, Bucket]] | None = None  # a batch to send again, with its id
        self.counters = {"flushes": 0, "flush_failures": 0, "loads": 0, "load_failures": 0, "duplicates": 0}

    @property
    def clean(self) -> bool:
        """Nothing is waiting to be sent again (loading now would not double count)."""
        return self._unsent is None

    async def flush(self) -> None:
        """Send the batch that failed last time (same id), then what is pending."""
        for _ in range(2):
            if self._unsent is None:
                batch = self.ledger.take_pending()
                if not batch:
                    return
                self._unsent = (os.urandom(8).hex(), batch)
            batch_id, batch = self._unsent
            keys, argv = flush_args(batch)
            if keys:
                try:
                    async with asyncio.timeout(self.timeout * 4):  # a big batch takes longer than a limit check
                        applied = await self._script(keys=[BATCH_PREFIX + batch_id, *keys],
                                                     args=[BATCH_TTL, EXPIRE_DAYS * DAY, *argv])  # fmt: skip
                except Exception:
                    self.counters["flush_failures"] += 1
                    raise
                self.counters["flushes" if applied else "duplicates"] += 1
            self._unsent = None

    async def load(self, days: Iterable[str]) -> None:
        """Read the days from Redis into the ledger. Only when ``clean``."""
        names = list(days)
        try:
            async with asyncio.timeout(self.timeout * 4):
                async with self.client.pipeline(transaction=False) as pipe:
                    for day in names:
                        pipe.hgetall(PREFIX + day)
                    raws = await pipe.execute()
        except Exception:
            self.counters["load_failures"] += 1
            raise
        for day, raw in zip(names, raws, strict=True):
            if raw or day in self.ledger.days:
                self.ledger.replace_day(day, decode_day(raw))
        self.counters["loads"] += 1

    async def load_all(self, now: float) -> None:
        """Every day a budget or the default /usage window can read: since the start of last month."""
        first = datetime.date.fromisoformat(previous_month_start(now))
        span = (datetime.date.fromisoformat(day_of(now)) - first).days
        await self.load((first + datetime.timedelta(days=d)).isoformat() for d in range(span + 1))

    async def load_recent(self, now: float) -> None:
        """Today and yesterday: what other sidecars still add to."""
        await self.load((day_of(now - DAY), day_of(now)))

    def statistics(self) -> dict[str, int]:
        return {**self.counters, "unsent": int(self._unsent is not None)}

    def __repr__(self) -> str:
        return f"RedisLedger(flushes={self.counters['flushes']}, unsent={self._unsent is not None})"
