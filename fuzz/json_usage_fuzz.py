"""Fuzz the JSON usage reader and the request estimate (addons/usage/tokens.py): bytes in,
numbers out, never an exception. Counts are never negative and the parts stay within
their totals (cached within input, reasoning within output).

The first byte picks the wire; the rest is the body.

    python fuzz/json_usage_fuzz.py -atheris_runs=5000 /tmp/new fuzz/corpus/json_usage
"""

from __future__ import annotations

import sys

import atheris

# Coverage from sidekey's own modules only (why: fuzz/sse_usage_fuzz.py, the same import).
with atheris.instrument_imports(include=["addons", "proxy"]):
    from addons.usage.tokens import Usage, Wire, estimate_request, reservation, usage_from_json


def check(usage: Usage) -> None:
    parts = (usage.input, usage.output, usage.cached_input, usage.reasoning, usage.cache_creation)
    if min(parts) < 0:
        raise AssertionError(f"a negative count: {usage}")
    if usage.cached_input + usage.cache_creation > usage.input or usage.reasoning > usage.output:
        raise AssertionError(f"a part larger than its total: {usage}")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    wire: Wire = "openai" if data[0] & 1 else "anthropic"
    body = data[1:]
    usage = usage_from_json(body, wire)
    if usage is not None:
        check(usage)
    estimate = estimate_request(body, wire, max_parse=4096 if data[0] & 2 else 1 << 20)
    if estimate.prompt_tokens < 0 or estimate.max_output <= 0:
        raise AssertionError(f"an impossible estimate: {estimate}")
    if reservation(body, len(body)) < 0:
        raise AssertionError("a negative reservation")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
