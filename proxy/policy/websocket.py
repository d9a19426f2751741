"""Policy reader for WebSocket sessions. Split from ``proxy.policy.load``
(same conventions: every problem names file, line and field; values are
never echoed).

    providers:
      openai:
        websocket: true                  # default: true when a host is known to offer WebSocket
        websocket_idle_timeout: 5m       # no frame either way: closed with 1001 (default 300 s)
        websocket_max_duration: 1h       # then closed with 1001 (default 3600 s)
        websocket_usage: openai-realtime # meter response.done usage (default: none)
        limits: {concurrent_websockets: 20}         # sessions at once, this process
        caller_limits: {concurrent_websockets: 2}   # per caller
"""

from __future__ import annotations

from typing import Literal, cast

import yaml

from proxy.policy.fields import Invalid, Reader, join
from proxy.policy.model import WebSocketPolicy

FIELDS = frozenset({"websocket", "websocket_idle_timeout", "websocket_max_duration", "websocket_usage"})
LIMIT_KEY = "concurrent_websockets"  # read here, allowed in ``limits`` and ``caller_limits``
USAGE = ("none", "openai-realtime")

# Hosts whose APIs offer WebSocket endpoints (OpenAI Realtime and the Responses
# API's WebSocket mode, Azure OpenAI realtime, Gemini Live, speech APIs): a
# provider naming one allows sessions unless it says ``websocket: false``.
KNOWN_HOSTS: tuple[str, ...] = (
    "api.openai.com",
    "*.openai.azure.com",
    "generativelanguage.googleapis.com",
    "api.elevenlabs.io",
    "api.deepgram.com",
    "streaming.assemblyai.com",
    "api.cartesia.ai",
)


def offers_websocket(hosts: tuple[str, ...]) -> bool:
    """Whether any of a provider's host patterns is (or lies under) a known WebSocket host."""
    for host in hosts:
        for known in KNOWN_HOSTS:
            if host == known or (known.startswith("*.") and host.endswith(known[1:])):
                return True
    return False


def read(r: Reader, f: dict[str, yaml.Node], field: str, hosts: tuple[str, ...]) -> WebSocketPolicy:
    d = WebSocketPolicy()
    allowed = r.opt(f, field, "websocket", r.flag, offers_websocket(hosts))
    usage = r.opt(f, field, "websocket_usage", lambda n, w: r.choice(n, w, USAGE), "none")
    return WebSocketPolicy(
        allowed=allowed,
        idle_timeout=r.opt(f, field, "websocket_idle_timeout", r.duration, d.idle_timeout),
        max_duration=r.opt(f, field, "websocket_max_duration", r.duration, d.max_duration),
        usage=cast(Literal["none", "openai-realtime"], usage),
        max_sessions=_sessions(r, f.get("limits"), join(field, "limits")),
        caller_max_sessions=_sessions(r, f.get("caller_limits"), join(field, "caller_limits")),
    )


def _sessions(r: Reader, node: yaml.Node | None, field: str) -> int:
    """``concurrent_websockets`` of a limits mapping (0: none). The mapping's
    other keys and its shape are checked by ``quotas.rules``."""
    if not isinstance(node, yaml.MappingNode):
        return 0
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == LIMIT_KEY:
            try:
                return r.count(value_node, join(field, LIMIT_KEY))
            except Invalid:
                return 0
    return 0
