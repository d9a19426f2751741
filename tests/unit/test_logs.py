"""proxy.logs (formatters, format choice) and the access-log addon."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator

import pytest

from addons.access_log import AccessLog, path_without_values
from proxy import logs
from proxy.errors import UpstreamTimeout
from proxy.flow import Response
from proxy.testing import make_flow


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, Captured]]:
    logger = logging.getLogger("sidekey.test-access")
    handler = Captured()
    logger.addHandler(handler)
    logger.propagate = False
    yield logger, handler
    logger.removeHandler(handler)
    logger.propagate = True


def record(msg: str = "hello %s", args: tuple[object, ...] = ("world",), **extra: object) -> logging.LogRecord:
    made = logging.getLogger("sidekey.t").makeRecord("sidekey.t", logging.INFO, "f.py", 1, msg, args, None, extra=extra)
    made.created = 1764866366.1239  # 2025-12-04T16:39:26.123Z
    return made


def test_json_line_has_time_level_logger_message_and_the_fields() -> None:
    line = logs.JsonFormatter().format(record(request_id="ab", status=200, duration_ms=1.5, error=None))
    assert json.loads(line) == {
        "time": "2025-12-04T16:39:26.123Z", "level": "INFO", "logger": "sidekey.t", "message": "hello world",
        "request_id": "ab", "status": 200, "duration_ms": 1.5, "error": None,
    }  # fmt: skip
    assert "\n" not in line


def test_json_never_stringifies_an_object() -> None:
    class Holder:
        def __str__(self) -> str:
            return "sk-secret"

    line = logs.JsonFormatter().format(record(thing=Holder()))
    assert json.loads(line)["thing"] is None and "sk-secret" not in line
    assert "sk-secret" not in logs.TextFormatter().format(record(thing=Holder()))


def test_text_line_is_message_then_key_values_quoted_when_needed() -> None:
    line = logs.TextFormatter().format(record(caller="a b\nforged INFO line", status=200, error=None, path="/x?k="))
    assert line == (
        '2025-12-04T16:39:26.123Z INFO sidekey.t: hello world caller="a b\\nforged INFO line" status=200 error=- '
        'path="/x?k="'
    )
    assert logs.TextFormatter().format(record()) == "2025-12-04T16:39:26.123Z INFO sidekey.t: hello world"


def test_auto_is_text_on_a_terminal_and_json_otherwise() -> None:
    main, other = os.openpty()
    read, write = os.pipe()
    try:
        with open(other, "w", closefd=False) as tty, open(write, "w", closefd=False) as pipe:
            assert logs.resolve("auto", tty) == "text"
            assert logs.resolve("auto", pipe) == "json"
            assert logs.resolve("json", tty) == "json" and logs.resolve("text", pipe) == "text"
    finally:
        for fd in (main, other, read, write):
            os.close(fd)
    with pytest.raises(ValueError, match="log format"):
        logs.resolve("xml", io.StringIO())


def test_configure_writes_json_lines_to_a_stream_that_is_no_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing"):  # configure turns them off
        monkeypatch.setattr(logging, name, getattr(logging, name))
    root = logging.getLogger()
    before = root.handlers[:], root.level
    out = io.StringIO()
    try:
        assert logs.configure("info", "auto", out) == "json"
        logging.getLogger("sidekey.t").debug("hidden")
        logging.getLogger("sidekey.t").info("shown %d", 1, extra={"provider": "openai"})
    finally:
        root.handlers[:] = before[0]
        root.setLevel(before[1])
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["message"] == "shown 1" and entry["provider"] == "openai" and entry["level"] == "INFO"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])


@pytest.mark.parametrize(
    ("path", "shown"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/x?key=AIzaSECRET&q=1", "/v1/x?key=&q="),
        ("/v1/x?key=a=b&empty=&q", "/v1/x?key=&empty="),  # a bare part may be a value: dropped
        ("/v1/x?sk-bare-secret", "/v1/x?"),
        ("/v1/x?", "/v1/x?"),
    ],
)
def test_path_keeps_parameter_names_never_values(path: str, shown: str) -> None:
    assert path_without_values(path) == shown


def test_access_fields_of_a_served_and_a_failed_flow(captured: tuple[logging.Logger, Captured]) -> None:
    logger, handler = captured
    logger.setLevel(logging.INFO)
    addon = AccessLog(logger)
    flow = make_flow(method="GET", path="/v1/models?key=sk-SECRET", headers=[("authorization", "Bearer sk-SECRET")])
    flow.response = Response(200)
    flow.timings["end"] = flow.timings["start"] + 0.0125
    flow.metadata["attempts"] = 2
    addon.response(flow)
    failed = make_flow()
    failed.error = UpstreamTimeout("openai")
    failed.timings["end"] = failed.timings["start"]
    addon.error(failed)
    served, broken = (logs.fields(r) for r in handler.records)
    assert served == {
        "request_id": flow.id, "caller": "127.0.0.1", "method": "GET", "host": "api.openai.com",
        "path": "/v1/models?key=", "provider": "openai", "upstream": None, "status": 200,
        "duration_ms": 12.5, "attempts": 2, "error": None,
    }  # fmt: skip
    assert (broken["status"], broken["error"], broken["attempts"]) == (UpstreamTimeout.status, "upstream_timeout", 1)
    assert all(r.levelno == logging.INFO and r.getMessage() == "access" for r in handler.records)


def test_access_line_costs_nothing_when_info_is_off(captured: tuple[logging.Logger, Captured]) -> None:
    logger, handler = captured
    logger.setLevel(logging.WARNING)
    addon = AccessLog(logger)
    addon.fields = None  # type: ignore[assignment, method-assign]  # would raise if the line were built
    flow = make_flow()
    flow.response = Response(200)
    addon.response(flow)
    assert handler.records == []


def test_hand_joined_json_is_what_json_reads() -> None:
    """The JSON formatter joins strings by hand (cheaper than json.dumps): odd
    values must still come out as valid JSON with the same meaning."""
    odd = {
        "text": 'quote " backslash \\ newline \n tab \t ü €', "int": -3, "float": 0.1, "inf": float("inf"),
        "true": True, "false": False, "none": None, "list": [1, "a"], "dict": {"k": None}, "obj": object(),
    }  # fmt: skip
    line = logs.JsonFormatter().format(record(msg='say "%s"', args=("\x00",), **odd))
    entry = json.loads(line)
    assert entry["message"] == 'say "\x00"' and "\n" not in line
    assert {k: entry[k] for k in odd} == {**odd, "inf": None, "obj": None}
    assert list(entry)[4:] == list(odd)  # the fields in the order given


def test_fields_of_a_record_made_by_hand_are_found_too() -> None:
    made = logging.LogRecord("sidekey.t", logging.INFO, "", 0, "m", None, None)
    del made.thread  # not in the usual order any more: the slow path still finds the fields
    made.provider = "openai"
    assert logs.fields(made) == {"provider": "openai"}
    assert logs.fields(logging.LogRecord("sidekey.t", logging.INFO, "", 0, "m", None, None)) == {}
