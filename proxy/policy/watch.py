"""Watch the policy file and reload it when it changes.

Polls ``os.stat`` (following symlinks) off the event loop. That catches an
editor's in-place write, a rename over the file, and the atomic symlink swap
Kubernetes uses for ConfigMap volumes (``policies.yaml -> ..data/...``), where
inotify on the file itself would miss the swap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable

log = logging.getLogger("sidekey.watch")

Stamp = tuple[int, int, int, int] | None


def stamp(path: str) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None  # mid-swap or deleted: keep the running policy
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class PolicyWatcher:
    def __init__(
        self,
        path: str,
        on_change: Callable[[], Awaitable[object]],
        *,
        interval: float = 1.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.path = path
        self.interval = interval
        self._on_change = on_change
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None
        self.checks = 0
        self.changes = 0

    async def start(self) -> None:
        self._last = await asyncio.to_thread(stamp, self.path)
        self._task = asyncio.create_task(self._run(), name="sidekey-policy-watch")

    async def _run(self) -> None:
        while True:
            await self._sleep(self.interval)
            await self.check()

    async def check(self) -> None:
        current = await asyncio.to_thread(stamp, self.path)
        self.checks += 1
        if current is None or current == self._last:
            return
        self._last = current
        self.changes += 1
        try:
            await self._on_change()
        except Exception:  # noqa: BLE001 - logged by the reload itself; keep watching
            log.debug("policy change not applied")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def statistics(self) -> dict[str, int]:
        return {"checks": self.checks, "changes": self.changes}
