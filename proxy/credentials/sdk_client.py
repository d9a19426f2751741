"""A cloud SDK's async client held for one secret store: opened on first use (so the
SDK is imported only by a policy that names the store), kept for every read, closed at
shutdown. ``aws_sm`` and ``azure_kv`` say how to open theirs."""

from __future__ import annotations

import contextlib
from typing import Any, Generic, TypeVar

StoreT = TypeVar("StoreT")


class SdkClient(Generic[StoreT]):
    def __init__(self, store: StoreT) -> None:
        self.store = store
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    async def _open(self, stack: contextlib.AsyncExitStack) -> Any:
        """The SDK's client, its contexts entered on ``stack``; raises ``SourceError``
        when the SDK is not installed."""
        raise NotImplementedError

    async def _get(self) -> Any:
        if self._client is None:
            self._client = await self._open(self._stack)
        return self._client

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None
