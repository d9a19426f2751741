"""Fuzz the SSE usage meter (addons/usage/stream.py): it never raises, and the totals
are the same however the stream is cut into chunks.

The first two bytes pick the wire and a split seed; the rest is the stream. It is fed
once whole and once cut at points drawn from the seed (single bytes, CR/LF pairs torn
apart, long runs); ``finish()`` must agree. The meter runs with a small ``max_line`` so
the over-long-line path is reachable. tests/unit/test_usage.py holds the hypothesis
property over generated event streams; this drives arbitrary bytes.

    python fuzz/sse_usage_fuzz.py -atheris_runs=5000 /tmp/new fuzz/corpus/sse_usage
"""

from __future__ import annotations

import random
import sys

import atheris

# Coverage from sidekey's own modules only: importing addons.usage runs addons/__init__, which
# imports every addon and with them aiohttp, redis, prometheus_client and much of the stdlib;
# instrumenting those 338 modules took ~57 s of CPU at each start (the 3,000 inputs ~10 s), so
# a loaded machine timed the smoke test out before the first input. Now ~60 modules.
with atheris.instrument_imports(include=["addons", "proxy"]):
    from addons.usage.stream import SSEUsageMeter
    from addons.usage.tokens import RequestEstimate, Wire

MAX_LINE = 256
ESTIMATE = RequestEstimate(prompt_tokens=7, max_output=100, model="fallback-model")


def run(wire: Wire, chunks: list[bytes], estimate: RequestEstimate | None) -> tuple[object, bool, int]:
    meter = SSEUsageMeter(wire, max_line=MAX_LINE)
    for chunk in chunks:
        meter.feed(chunk)
    usage = meter.finish(estimate)
    repr(meter)
    return usage, meter.reported, meter.statistics()["bytes"]


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    wire: Wire = "openai" if data[0] & 1 else "anthropic"
    estimate = ESTIMATE if data[0] & 2 else None
    stream = data[2:]
    rng = random.Random(data[1])
    cuts = sorted({rng.randrange(len(stream) + 1) for _ in range(rng.randrange(1, 8))}) if stream else []
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    whole = run(wire, [stream], estimate)
    split = run(wire, pieces, estimate)
    if whole != split:
        raise AssertionError(f"totals depend on the chunk split: {whole} != {split} at {cuts}")
    if data[1] & 1:  # byte by byte: every CR/LF pair torn apart
        single = run(wire, [stream[i : i + 1] for i in range(len(stream))], estimate)
        if whole != single:
            raise AssertionError(f"totals differ when fed byte by byte: {whole} != {single}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
