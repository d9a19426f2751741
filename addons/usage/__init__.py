"""The usage addon (``addon``) and what only it uses: token counts and request
estimates (``tokens``), the streamed-answer meter (``stream``), the per-day
ledger (``ledger``) and the price table (``prices``)."""

from addons.usage.addon import UsageMeter

__all__ = ["UsageMeter"]
