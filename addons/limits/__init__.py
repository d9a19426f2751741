"""The limits addon (``addon``) and what only it uses: the limiter arithmetic
(``arithmetic``), the same decisions made in Redis for a fleet (``redis_limiter``),
and what it does while Redis is out of reach (``degraded``)."""

from addons.limits.addon import Limits

__all__ = ["Limits"]
