"""Token accounting: request estimates, usage from JSON answers and from SSE
streams split anywhere. Transcripts are byte-for-byte the shapes the providers
send (compact JSON, ``data:`` + blank line framing, Anthropic ``event:`` lines)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addons.usage.stream import SSEUsageMeter
from addons.usage.tokens import (
    DEFAULT_MAX_OUTPUT,
    IMAGE_TOKENS,
    MAX_OUTPUT,
    RequestEstimate,
    Usage,
    Wire,
    estimate_request,
    usage_from_json,
)

# fmt: off
_C = '"id":"chatcmpl-BVw3CTFCrMH8VqyDDFvzGxYZCxDkB","object":"chat.completion.chunk","created":1746694122,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_f5bdcc3276"'
_PIECES = ["Hello", "!", " How", " can", " I", " help", " you", " today", "?"]  # 32 bytes of text


def _chat(with_usage: bool) -> bytes:
    null = ',"usage":null' if with_usage else ""
    out = [f'data: {{{_C},"choices":[{{"index":0,"delta":{{"role":"assistant","content":"","refusal":null}},"logprobs":null,"finish_reason":null}}]{null}}}\n\n']
    out += [f'data: {{{_C},"choices":[{{"index":0,"delta":{{"content":"{p}"}},"logprobs":null,"finish_reason":null}}]{null}}}\n\n' for p in _PIECES]
    out.append(f'data: {{{_C},"choices":[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"stop"}}]{null}}}\n\n')
    if with_usage:
        out.append(f'data: {{{_C},"choices":[],"usage":{{"prompt_tokens":1234,"completion_tokens":10,"total_tokens":1244,"prompt_tokens_details":{{"cached_tokens":1024,"audio_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}}}}\n\n')
    out.append("data: [DONE]\n\n")
    return "".join(out).encode()


OPENAI_CHAT = _chat(with_usage=False)
OPENAI_CHAT_USAGE = _chat(with_usage=True)

OPENAI_REASONING = (
    b'data: {"id":"chatcmpl-BVx1","object":"chat.completion.chunk","created":1746694200,"model":"o4-mini-2025-04-16","service_tier":"default","system_fingerprint":null,"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-BVx1","object":"chat.completion.chunk","created":1746694200,"model":"o4-mini-2025-04-16","service_tier":"default","system_fingerprint":null,"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_Xq1","type":"function","function":{"name":"get_weather","arguments":""}}]},"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-BVx1","object":"chat.completion.chunk","created":1746694200,"model":"o4-mini-2025-04-16","service_tier":"default","system_fingerprint":null,"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"city\\":\\"Paris\\"}"}}]},"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-BVx1","object":"chat.completion.chunk","created":1746694200,"model":"o4-mini-2025-04-16","service_tier":"default","system_fingerprint":null,"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-BVx1","object":"chat.completion.chunk","created":1746694200,"model":"o4-mini-2025-04-16","service_tier":"default","system_fingerprint":null,"choices":[],"usage":{"prompt_tokens":88,"completion_tokens":210,"total_tokens":298,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":192,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}\n\n'
    b"data: [DONE]\n\n"
)

_G = b'"id":"chatcmpl-7c1e2b9a-3f4d-4e3b-9d0a-4c1f9e2b7a61","object":"chat.completion.chunk","created":1746694300,"model":"llama-3.3-70b-versatile","system_fingerprint":"fp_6507bcfb6f"'
GROQ = (
    b"data: {" + _G + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"x_groq":{"id":"req_01jtv6p0nqe8ns0y8bz6mzt1a3"}}\n\n'
    b"data: {" + _G + b',"choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}]}\n\n'
    b"data: {" + _G + b',"choices":[{"index":0,"delta":{"content":" there"},"logprobs":null,"finish_reason":null}]}\n\n'
    b"data: {" + _G + b',"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"x_groq":{"id":"req_01jtv6p0nqe8ns0y8bz6mzt1a3","usage":{"queue_time":0.050217,"prompt_tokens":41,"prompt_time":0.002329,"completion_tokens":9,"completion_time":0.032727,"total_tokens":50,"total_time":0.035056}}}\n\n'
    b"data: [DONE]\n\n"
)

_R = b'"id":"resp_681c4b4c5ee08190b1c1b7a2c24bd1f8","object":"response","created_at":1746684748,"error":null,"incomplete_details":null,"instructions":"You are terse.","max_output_tokens":null,"model":"gpt-4.1-2025-04-14","parallel_tool_calls":true,"previous_response_id":null,"reasoning":{"effort":null,"summary":null},"store":true,"temperature":1.0,"text":{"format":{"type":"text"}},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled"'
_MSG = b'"id":"msg_681c4b4d0f708190a6e3a1b5c2d74e0c"'
RESPONSES = (
    b'event: response.created\ndata: {"type":"response.created","sequence_number":0,"response":{' + _R + b',"status":"in_progress","output":[],"usage":null,"user":null,"metadata":{}}}\n\n'
    b'event: response.in_progress\ndata: {"type":"response.in_progress","sequence_number":1,"response":{' + _R + b',"status":"in_progress","output":[],"usage":null,"user":null,"metadata":{}}}\n\n'
    b'event: response.output_item.added\ndata: {"type":"response.output_item.added","sequence_number":2,"output_index":0,"item":{' + _MSG + b',"type":"message","status":"in_progress","content":[],"role":"assistant"}}\n\n'
    b'event: response.content_part.added\ndata: {"type":"response.content_part.added","sequence_number":3,"item_id":"msg_681c4b4d0f708190a6e3a1b5c2d74e0c","output_index":0,"content_index":0,"part":{"type":"output_text","annotations":[],"text":""}}\n\n'
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":4,"item_id":"msg_681c4b4d0f708190a6e3a1b5c2d74e0c","output_index":0,"content_index":0,"delta":"Paris"}\n\n'
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":5,"item_id":"msg_681c4b4d0f708190a6e3a1b5c2d74e0c","output_index":0,"content_index":0,"delta":"."}\n\n'
    b'event: response.output_text.done\ndata: {"type":"response.output_text.done","sequence_number":6,"item_id":"msg_681c4b4d0f708190a6e3a1b5c2d74e0c","output_index":0,"content_index":0,"text":"Paris."}\n\n'
    b'event: response.content_part.done\ndata: {"type":"response.content_part.done","sequence_number":7,"item_id":"msg_681c4b4d0f708190a6e3a1b5c2d74e0c","output_index":0,"content_index":0,"part":{"type":"output_text","annotations":[],"text":"Paris."}}\n\n'
    b'event: response.output_item.done\ndata: {"type":"response.output_item.done","sequence_number":8,"output_index":0,"item":{' + _MSG + b',"type":"message","status":"completed","content":[{"type":"output_text","annotations":[],"text":"Paris."}],"role":"assistant"}}\n\n'
    b'event: response.completed\ndata: {"type":"response.completed","sequence_number":9,"response":{' + _R + b',"status":"completed","output":[{' + _MSG + b',"type":"message","status":"completed","content":[{"type":"output_text","annotations":[],"text":"Paris."}],"role":"assistant"}],"usage":{"input_tokens":37,"input_tokens_details":{"cached_tokens":0},"output_tokens":11,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":48},"user":null,"metadata":{}}}\n\n'
)

ANTHROPIC = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-sonnet-4-20250514","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":472,"cache_creation_input_tokens":0,"cache_read_input_tokens":2048,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":2,"service_tier":"standard"}}}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
    b'event: ping\ndata: {"type": "ping"}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"! How can I help you today?"}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)

ANTHROPIC_TOOLS = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_014p7gG3wDgGV9EUtLvnow3U","type":"message","role":"assistant","model":"claude-opus-4-1-20250805","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":1210,"cache_creation_input_tokens":3000,"cache_read_input_tokens":0,"output_tokens":1}}}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":"","signature":""}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"The user wants the weather."}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\\"location\\": \\"San Fra"}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"ncisco\\"}"}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":1}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"input_tokens":1210,"cache_creation_input_tokens":3000,"cache_read_input_tokens":0,"output_tokens":89}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)

PROMPT = RequestEstimate(prompt_tokens=50, max_output=4096, model="gpt-4o")

STREAMS: list[tuple[str, Wire, bytes, Usage]] = [
    ("openai chat, no include_usage", "openai", OPENAI_CHAT, Usage(50, 8, estimated=True, model="gpt-4o-2024-08-06")),
    ("openai chat, include_usage", "openai", OPENAI_CHAT_USAGE, Usage(1234, 10, cached_input=1024, model="gpt-4o-2024-08-06")),
    ("openai reasoning + tool call", "openai", OPENAI_REASONING, Usage(88, 210, reasoning=192, model="o4-mini-2025-04-16")),
    ("groq x_groq.usage", "openai", GROQ, Usage(41, 9, model="llama-3.3-70b-versatile")),
    ("openai responses api", "openai", RESPONSES, Usage(37, 11, model="gpt-4.1-2025-04-14")),
    ("anthropic messages, cache read", "anthropic", ANTHROPIC, Usage(2520, 15, cached_input=2048, model="claude-sonnet-4-20250514")),
    ("anthropic thinking + tool use, cache write", "anthropic", ANTHROPIC_TOOLS, Usage(4210, 89, cache_creation=3000, model="claude-opus-4-1-20250805")),
]
# fmt: on


def meter_usage(wire: Wire, chunks: list[bytes], **kw: int) -> tuple[Usage, dict[str, int]]:
    m = SSEUsageMeter(wire, **kw)
    for c in chunks:
        m.feed(c)
    return m.finish(PROMPT), m.statistics()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def line_endings(data: bytes, ending: bytes) -> bytes:
    return data.replace(b"\n", ending)


@pytest.mark.parametrize(("name", "wire", "stream", "expected"), STREAMS, ids=[s[0] for s in STREAMS])
def test_stream_totals(name: str, wire: Wire, stream: bytes, expected: Usage) -> None:
    usage, stats = meter_usage(wire, [stream])
    assert usage == expected
    assert stats["dropped"] == stats["bad_json"] == 0
    assert stats["parsed"] <= 2  # only events holding a usage object are parsed


@pytest.mark.parametrize(("name", "wire", "stream", "expected"), STREAMS, ids=[s[0] for s in STREAMS])
@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_single_byte_chunks(name: str, wire: Wire, stream: bytes, expected: Usage, ending: bytes) -> None:
    data = line_endings(stream, ending)
    assert meter_usage(wire, [data[i : i + 1] for i in range(len(data))])[0] == expected


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(STREAMS), st.sampled_from([b"\n", b"\r\n", b"\r"]), st.lists(st.integers(0, 1 << 16), max_size=40)
)
def test_every_split_gives_the_same_totals(
    case: tuple[str, Wire, bytes, Usage], ending: bytes, cuts: list[int]
) -> None:
    _, wire, stream, expected = case
    data = line_endings(stream, ending)
    usage, stats = meter_usage(wire, split(data, cuts))
    assert usage == expected
    assert stats == meter_usage(wire, [data])[1]


def test_include_usage_stream_parses_one_event_of_many() -> None:
    first, content, *rest = OPENAI_CHAT_USAGE.split(b"\n\n")
    stream = b"\n\n".join([first, *[content] * 500, *rest])  # "usage":null on 502 chunks, an object on one
    usage, stats = meter_usage("openai", [stream[i : i + 4096] for i in range(0, len(stream), 4096)])
    assert usage.input == 1234 and stats["parsed"] == 1
    assert stats["text_bytes"] == 500 * len(b"Hello") + len("".join(_PIECES[1:]))


def test_text_fallback_counts_streamed_text_at_four_bytes_a_token() -> None:
    m = SSEUsageMeter("openai")
    m.feed(OPENAI_CHAT)
    assert not m.reported
    assert m.statistics()["text_bytes"] == len("".join(_PIECES).encode())
    assert m.finish() == Usage(0, 8, estimated=True, model="gpt-4o-2024-08-06")  # no request estimate: input 0
    no_model = SSEUsageMeter("openai").finish(RequestEstimate(7, 100, model="gpt-4o"))
    assert no_model == Usage(7, 0, estimated=True, model="gpt-4o")  # the request's model when the stream has none


def test_anthropic_stream_cut_before_message_delta_estimates_the_output() -> None:
    cut = ANTHROPIC.split(b"event: message_delta")[0]
    usage, _ = meter_usage("anthropic", [cut])
    # input and cache counts are real (message_start); output is the larger of the placeholder and the text
    assert usage == Usage(2520, 8, cached_input=2048, estimated=True, model="claude-sonnet-4-20250514")


def test_responses_usage_is_found_at_the_end_of_an_over_long_completed_event() -> None:
    big = "x" * 5000
    stream = RESPONSES.replace(
        b'"text":"Paris."}],"role":"assistant"}],"usage"', f'"text":"{big}"}}],"role":"assistant"}}],"usage"'.encode()
    )
    assert len(stream.split(b"\n")[-3]) > 5000
    for chunks in ([stream], [stream[:-300], stream[-300:]], [stream[i : i + 7] for i in range(0, len(stream), 7)]):
        usage, stats = meter_usage("openai", chunks, max_line=1024)
        assert usage == Usage(37, 11, model="gpt-4.1-2025-04-14")
        assert stats["dropped"] == 1


@pytest.mark.parametrize("head", [b"", b": keep-alive\n\n"])
def test_multi_line_data_joins_with_lf_and_comments_and_a_leading_bom_are_ignored(head: bytes) -> None:
    stream = (
        b"\xef\xbb\xbf"
        + head
        + b'data: {"choices":[],"model":"gpt-4o",\ndata: "usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
    )
    assert meter_usage("openai", [stream])[0] == Usage(3, 4, model="gpt-4o")
    assert meter_usage("openai", [bytes([b]) for b in stream])[0] == Usage(3, 4, model="gpt-4o")


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_multi_line_data_survives_any_split_of_its_line_endings(ending: bytes) -> None:
    stream = line_endings(
        b'data: {"model":"gpt-4o",\ndata: "usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n', ending
    )
    for i in range(len(stream) + 1):
        assert meter_usage("openai", [stream[:i], stream[i:]])[0] == Usage(3, 4, model="gpt-4o")


def test_an_event_with_an_over_long_line_is_dropped_whole() -> None:
    stream = (
        b'data: {"choices":[],\ndata: "'
        + b"x" * 100
        + b'",\ndata: "usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
    )
    for chunks in ([stream], [stream[i : i + 1] for i in range(len(stream))]):
        usage, stats = meter_usage("openai", chunks, max_line=64)
        assert usage.estimated and stats["dropped"] == 1 and stats["parsed"] == 0


def test_an_over_long_line_between_plain_events_is_dropped() -> None:
    first, rest = b'data: {"model":"m"}\n\n', b": " + b"x" * 100 + b'\n\ndata: {"delta":{"content":"abcd"}}\n\n'
    for chunks in ([first + rest], [first, rest], [bytes([b]) for b in first + rest]):
        usage, stats = meter_usage("openai", chunks, max_line=64)
        assert (usage.output, stats["dropped"], stats["text_bytes"]) == (1, 1, 4)


def test_a_stream_cut_mid_event_still_counts_what_arrived() -> None:
    last = OPENAI_CHAT_USAGE.split(b"data: [DONE]")[0].rstrip(b"\n")  # no blank line, no final newline
    assert meter_usage("openai", [last])[0].input == 1234


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\xff" * 5000,
        b"data: " + b"{" * 100_000 + b"\n\n",  # nests too deep for json
        b'data: {"usage":{"prompt_tokens":"many","completion_tokens":-3}}\n\n',
        b'data: {"usage":{"prompt_tokens":true}}\n\ndata: ["usage",{}]\n\n',
        b'data: {"usage":{ not json\n\n',
        b'event: message_start\ndata: {"type":"message_start","message":"nope","usage":{}}\n\n',
        b"\r\r\r\n\n\n" * 1000,
        b"data:" * 300_000,
    ],
)
@pytest.mark.parametrize("wire", ["openai", "anthropic"])
def test_garbage_never_raises_and_stays_bounded(garbage: bytes, wire: Wire) -> None:
    m = SSEUsageMeter(wire, max_line=4096)
    for i in range(0, len(garbage), 1000):
        m.feed(garbage[i : i + 1000])
        assert m.statistics()["buffered"] <= 2 * 4096 + 16 * 1024
    usage = m.finish(PROMPT)
    assert usage.estimated and usage.input == PROMPT.prompt_tokens


def test_one_huge_line_is_dropped_not_buffered() -> None:
    m = SSEUsageMeter("openai", max_line=1 << 16)
    for _ in range(200):  # 20 MB without a newline
        m.feed(b"data: " + b"a" * 100_000)
        assert m.statistics()["buffered"] <= (1 << 16) + 16 * 1024
    m.feed(b"\n\n" + OPENAI_CHAT_USAGE)
    assert m.finish().input == 1234
    assert m.statistics()["dropped"] == 1


_TOKENS = [b"data: ", b"data:", b"event: x", b": c", b"\n", b"\r", b"\r\n", b'"usage":{', b'"usage":null', b'"model":"m"',
           b'{"usage":{"prompt_tokens":5,"completion_tokens":2}}', b'"content":"ab"', b'"delta":"c\\"d"', b"[DONE]", b"}",
           b"\xef\xbb\xbf", b"\xe2\x82"]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS) | st.binary(max_size=40), max_size=60), st.lists(st.integers(0, 1 << 16), max_size=30),
       st.sampled_from(["openai", "anthropic"]))  # fmt: skip
def test_garbage_gives_the_same_result_for_every_split(parts: list[bytes], cuts: list[int], wire: Wire) -> None:
    data = b"".join(parts)
    whole = meter_usage(wire, [data], max_line=48)
    pieces = meter_usage(wire, split(data, cuts), max_line=48)
    # The totals never depend on the split. (The "dropped" statistic may: an
    # over-long line cut before its end is counted when the cut shows it too long.)
    assert pieces[0] == whole[0]
    assert {k: v for k, v in pieces[1].items() if k != "dropped"} == {
        k: v for k, v in whole[1].items() if k != "dropped"
    }
    assert whole[1]["buffered"] == 0


def test_statistics_and_repr() -> None:
    m = SSEUsageMeter("anthropic")
    m.feed(ANTHROPIC)
    assert m.reported
    assert m.statistics() == {
        "bytes": len(ANTHROPIC),
        "parsed": 2,
        "dropped": 0,
        "bad_json": 0,
        "text_bytes": 32,
        "buffered": 0,
    }
    assert repr(m) == "SSEUsageMeter(anthropic, model='claude-sonnet-4-20250514', parsed=2, dropped=0, reported=True)"


# --- usage_from_json ----------------------------------------------------------------------------------------

JSON_ANSWERS: list[tuple[str, Wire, dict[str, object], Usage | None]] = [
    ("openai chat", "openai", {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18", "choices": [],
     "usage": {"prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306, "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
               "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}},
     Usage(2006, 300, cached_input=1920, model="gpt-4o-mini-2024-07-18")),
    ("openai responses", "openai", {"id": "resp_1", "object": "response", "model": "o3-2025-04-16", "output": [],
     "usage": {"input_tokens": 328, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 1186, "output_tokens_details": {"reasoning_tokens": 1024}, "total_tokens": 1514}},
     Usage(328, 1186, reasoning=1024, model="o3-2025-04-16")),
    ("groq", "openai", {"id": "chatcmpl-2", "object": "chat.completion", "model": "llama-3.1-8b-instant", "choices": [],
     "usage": {"queue_time": 0.017, "prompt_tokens": 18, "prompt_time": 0.0009, "completion_tokens": 120, "completion_time": 0.1, "total_tokens": 138, "total_time": 0.1},
     "x_groq": {"id": "req_01"}}, Usage(18, 120, model="llama-3.1-8b-instant")),
    ("anthropic", "anthropic", {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-3-5-haiku-20241022", "content": [],
     "usage": {"input_tokens": 20, "cache_creation_input_tokens": 1500, "cache_read_input_tokens": 6000, "output_tokens": 77, "service_tier": "standard"}},
     Usage(7520, 77, cached_input=6000, cache_creation=1500, model="claude-3-5-haiku-20241022")),
    ("openai embeddings", "openai", {"object": "list", "data": [], "model": "text-embedding-3-small", "usage": {"prompt_tokens": 8, "total_tokens": 8}},
     Usage(8, 0, model="text-embedding-3-small")),
    ("openai error", "openai", {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}, None),
    ("anthropic error", "anthropic", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, None),
    ("cached beyond the prompt is clamped", "openai", {"usage": {"prompt_tokens": 10, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 50},
     "completion_tokens_details": {"reasoning_tokens": 9}}}, Usage(10, 1, cached_input=10, reasoning=1)),
    ("usage of the wrong type", "openai", {"usage": [1, 2]}, None),
    ("counts of the wrong type", "anthropic", {"usage": {"input_tokens": "3", "output_tokens": None}}, None),
]  # fmt: skip


@pytest.mark.parametrize(("name", "wire", "doc", "expected"), JSON_ANSWERS, ids=[a[0] for a in JSON_ANSWERS])
def test_usage_from_json(name: str, wire: Wire, doc: dict[str, object], expected: Usage | None) -> None:
    assert usage_from_json(json.dumps(doc).encode(), wire) == expected


@pytest.mark.parametrize("body", [b"", b"not json", b"\xff\xfe\x00", b"[1,2]", b"null", b"[" * 100_000])
def test_usage_from_garbage_is_none(body: bytes) -> None:
    assert usage_from_json(body, "openai") is None


def test_usage_rejects_negative_counts() -> None:
    with pytest.raises(ValueError):
        Usage(-1, 0)


# --- estimate_request ---------------------------------------------------------------------------------------


def _req(**kw: object) -> bytes:
    return json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 400}], **kw}).encode()


@pytest.mark.parametrize(
    ("wire", "body", "cap", "explicit"),
    [
        ("openai", _req(max_tokens=100), 100, True),
        ("openai", _req(max_completion_tokens=200), 200, True),
        ("openai", _req(max_completion_tokens=200, max_tokens=100), 200, True),  # the newer spelling wins
        ("openai", json.dumps({"model": "gpt-4.1", "input": "hi", "max_output_tokens": 300}).encode(), 300, True),
        ("anthropic", _req(max_tokens=1024), 1024, True),
        ("anthropic", _req(max_completion_tokens=10), DEFAULT_MAX_OUTPUT, False),  # not an Anthropic field
        ("openai", _req(), DEFAULT_MAX_OUTPUT, False),
        ("openai", _req(max_tokens="100"), DEFAULT_MAX_OUTPUT, False),
        ("openai", _req(max_tokens=-5), DEFAULT_MAX_OUTPUT, False),
        ("openai", _req(max_tokens=0), DEFAULT_MAX_OUTPUT, False),
        ("openai", _req(max_tokens=True), DEFAULT_MAX_OUTPUT, False),
        ("openai", _req(max_tokens=512.0), 512, True),
        ("openai", _req(max_tokens=10**30), MAX_OUTPUT, True),
    ],
)
def test_output_cap_spellings(wire: Wire, body: bytes, cap: int, explicit: bool) -> None:
    est = estimate_request(body, wire)
    assert (est.max_output, est.explicit_cap) == (cap, explicit)


def test_default_cap_is_configurable() -> None:
    est = estimate_request(_req(), "openai", default_max_output=256)
    assert est.max_output == 256 and est.worst_case == est.prompt_tokens + 256


@pytest.mark.parametrize(
    ("body", "stream", "include_usage"),
    [
        (_req(), False, False),
        (_req(stream=True), True, False),
        (_req(stream=True, stream_options={"include_usage": True}), True, True),
        (_req(stream="yes", stream_options={"include_usage": 1}), False, False),
        (_req(stream=True, stream_options=[True]), True, False),
    ],
)
def test_stream_flags(body: bytes, stream: bool, include_usage: bool) -> None:
    est = estimate_request(body, "openai")
    assert (est.stream, est.include_usage, est.model) == (stream, include_usage, "gpt-4o")


@pytest.mark.parametrize(
    ("wire", "doc", "tokens"),
    [
        ("openai", {"messages": [{"role": "user", "content": "abcd" * 100}]}, 104),  # 100 + 4 per message
        (
            "openai",
            {
                "messages": [
                    {"role": "system", "content": "a" * 40},
                    {"role": "user", "content": [{"type": "text", "text": "b" * 40}]},
                ]
            },
            8 + 10 + 10,
        ),
        (
            "openai",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 90_000}}
                        ],
                    }
                ]
            },
            4 + IMAGE_TOKENS,
        ),
        (
            "anthropic",
            {
                "system": [{"type": "text", "text": "s" * 80}],
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image",
                                "source": {"type": "base64", "media_type": "image/png", "data": "A" * 9000},
                            }
                        ],
                    }
                ],
            },
            20 + 4 + IMAGE_TOKENS,
        ),
        ("openai", {"input": "q" * 400, "instructions": "i" * 40}, 110),  # the Responses API
        ("openai", {"prompt": "p" * 40}, 10),  # legacy completions
        ("openai", {"input": [[1, 2, 3], [4, 5]]}, 5),  # embeddings of token ids
        ("openai", {"messages": [{"role": "user", "content": "中文" * 30}]}, 4 + 45),  # 180 UTF-8 bytes
        (
            "openai",
            {
                "messages": [],
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                        },
                    }
                ],
            },
            20,
        ),  # keys and values: 79 bytes
        ("openai", {"messages": "not a list", "model": 42}, 3),
    ],
)
def test_prompt_estimates(wire: Wire, doc: dict[str, object], tokens: int) -> None:
    assert estimate_request(json.dumps(doc).encode(), wire).prompt_tokens == tokens


@pytest.mark.parametrize(
    "body", [b"", b"garbage!", b"\xff\xfe\xfd", b"[1,2,3]", b"[" * 200_000, b'"a string"', b"1e999999"]
)
@pytest.mark.parametrize("wire", ["openai", "anthropic"])
def test_unparseable_requests_are_estimated_from_their_length(body: bytes, wire: Wire) -> None:
    est = estimate_request(body, wire)
    assert est == RequestEstimate(-(-len(body) // 4), DEFAULT_MAX_OUTPUT, parsed=False)


def test_bodies_past_the_parse_limit_are_sniffed_not_parsed() -> None:
    body = json.dumps(
        {"messages": [{"role": "user", "content": "z" * 5000}], "model": "claude-sonnet-4-5", "stream": True}
    ).encode()
    est = estimate_request(body, "anthropic", max_parse=1000)
    assert est == RequestEstimate(-(-len(body) // 4), DEFAULT_MAX_OUTPUT, "claude-sonnet-4-5", True, parsed=False)
