"""Raise the open-files soft limit at start, as far as the hard limit allows.

Every client connection holds one descriptor and, while its request is upstream, a
second one for the pooled upstream connection; a long-lived SSE stream holds both
for its whole life. Ten thousand idle streams therefore need about 20,000
descriptors plus the listeners, logs and Redis, far above the 1,024 soft limit most
shells and container runtimes hand out. The hard limit is the operator's ceiling
(``ulimit -Hn``, the container's ``nofile``); an unprivileged process may raise its
soft limit up to it, so sidekey does, instead of failing with EMFILE at connection
1,020. ``fd_limit_target`` is the decision, pure; ``raise_fd_limit`` does the call.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("sidekey")

# select()-era code breaks above FD_SETSIZE, but asyncio uses epoll; the cap only
# keeps an "unlimited" hard limit from becoming a huge allocation in libraries that
# size tables by the soft limit.
FD_LIMIT_CAP = 1 << 20


def fd_limit_target(soft: int, hard: int, cap: int = FD_LIMIT_CAP) -> int | None:
    """The soft limit to ask for, or None when the current one should stay.

    ``resource.RLIM_INFINITY`` (-1) stands for "no limit" on either side.
    """
    inf = resource.RLIM_INFINITY
    ceiling = cap if hard == inf else min(hard, cap)
    if soft != inf and soft >= ceiling:
        return None
    if soft == inf:
        return None
    return ceiling


def raise_fd_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit toward the hard one; return (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = fd_limit_target(soft, hard)
    if target is None:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        # Some sandboxes refuse even a raise within the hard limit: run with what we have.
        log.warning("open-files limit stays %d (raising to %d refused: %s)", soft, target, type(exc).__name__)
        return soft, soft
    return soft, target
