"""Test doubles for sidekey integration tests."""

from .provider import (
    FakeProvider,
    FakeProviderThread,
    ReceivedRequest,
    bytes_sha256,
    pattern_bytes,
)

__all__ = [
    "FakeProvider",
    "FakeProviderThread",
    "ReceivedRequest",
    "bytes_sha256",
    "pattern_bytes",
]
