"""Reading the dead-letter file that ``addons.dlq`` writes (for ``sidekey dlq``).

The file is JSONL, rotated by size: ``path`` (newest) -> ``path.1`` -> ...
-> ``path.N`` (oldest). Two kinds of line: an entry (has ``id``) and a replay
mark (``{"replayed": ID, "time": ..., "status": ...}``) that ``sidekey dlq
replay`` appends. A mark is always newer than its entry, so reading newest
first meets the mark before the entry. Lines that do not parse (a crash
mid-write, a disk error) are skipped and counted, never fatal.

Plain blocking file I/O: this runs in the CLI, never on sidekey's event loop.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

BLOCK = 65536
# Framing and hop-by-hop fields: the replaying client redoes them (RFC 9110 §7.6.1).
REPLAY_DROP = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "proxy-connection", "te",
     "trailer", "upgrade", "expect"}
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class DeadLetter:
    entry: dict[str, Any]
    replay: dict[str, Any] | None = None  # the newest replay mark, if any

    @property
    def id(self) -> str:
        return str(self.entry["id"])

    @property
    def outcome(self) -> str:
        """The final status, or the error code when there was no upstream answer."""
        status, error = self.entry.get("status"), self.entry.get("error")
        return f"{status} {error}" if status is not None and error else str(status if status is not None else error)


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes | None


def lines_backwards(f: BinaryIO, block: int = BLOCK) -> Iterator[bytes]:
    """The non-empty lines of a file, last first, reading it in blocks from the end."""
    f.seek(0, os.SEEK_END)
    pos, tail = f.tell(), b""
    while pos > 0:
        step = min(block, pos)
        pos -= step
        f.seek(pos)
        pieces = (f.read(step) + tail).split(b"\n")
        tail = pieces.pop(0)  # may continue in the previous block
        yield from (line for line in reversed(pieces) if line.strip())
    if tail.strip():
        yield tail


def _is_entry(record: dict[str, Any]) -> bool:
    return (
        isinstance(record.get("id"), str)
        and isinstance(record.get("method"), str)
        and isinstance(record.get("url"), str)
        and isinstance(record.get("headers"), list)
    )


class DeadLetterFile:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.skipped = 0  # corrupt or unknown lines seen so far

    def files(self) -> list[Path]:
        """Existing files, newest first (``path``, ``path.1``, ... until one is missing)."""
        found = [self.path] if self.path.exists() else []
        n = 1
        while (older := self.path.with_name(f"{self.path.name}.{n}")).exists():
            found.append(older)
            n += 1
        return found

    def records(self) -> Iterator[dict[str, Any]]:
        """Every entry and replay mark, newest first, across the rotated files."""
        for file in self.files():
            try:
                f = open(file, "rb")  # noqa: SIM115 - closed in finally; a generator holds it
            except FileNotFoundError:  # rotated away while we read
                continue
            try:
                for line in lines_backwards(f):
                    try:
                        record = json.loads(line)
                    except ValueError:
                        record = None
                    if isinstance(record, dict) and (_is_entry(record) or isinstance(record.get("replayed"), str)):
                        yield record
                    else:
                        self.skipped += 1
            finally:
                f.close()

    def letters(self) -> Iterator[DeadLetter]:
        """Entries newest first, each with its newest replay mark."""
        replays: dict[str, dict[str, Any]] = {}
        for record in self.records():
            replayed = record.get("replayed")
            if isinstance(replayed, str):
                replays.setdefault(replayed, record)
            else:
                yield DeadLetter(record, replays.get(record["id"]))

    def find(self, request_id: str) -> DeadLetter | None:
        return next((letter for letter in self.letters() if letter.id == request_id), None)

    def mark_replayed(self, request_id: str, status: int | None, new_request_id: str | None, now: float) -> None:
        """Append a replay mark: one O_APPEND write, so it cannot interleave
        with the lines a running sidekey appends to the same file."""
        mark = {"replayed": request_id, "time": rfc3339(now), "status": status, "request_id": new_request_id}
        data = (json.dumps(mark, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


def rfc3339(now: float) -> str:
    return datetime.fromtimestamp(now, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def replay_request(entry: dict[str, Any], *, without_body: bool = False) -> ReplayRequest | str:
    """What to send again, or why it cannot be sent (a message for the operator)."""
    body: bytes | None
    if "body_omitted" in entry:
        if not without_body:
            return (
                f"the body of {entry['id']} was not stored ({entry['body_omitted']}); "
                "pass --without-body to replay it with an empty body"
            )
        body = None
    elif isinstance(entry.get("body_base64"), str):
        try:
            body = base64.b64decode(entry["body_base64"], validate=True)
        except (binascii.Error, ValueError):
            return f"the stored body of {entry['id']} is not valid base64"
    else:
        body = str(entry.get("body") or "").encode("utf-8")
    headers = [
        (str(pair[0]), str(pair[1]))
        for pair in entry["headers"]
        if isinstance(pair, list) and len(pair) == 2 and str(pair[0]).lower() not in REPLAY_DROP
    ]
    return ReplayRequest(str(entry["method"]), str(entry["url"]), headers, body or None)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def table(letters: list[DeadLetter]) -> list[str]:
    """``sidekey dlq list`` output: one row per entry, newest first."""
    rows = [("ID", "TIME", "PROVIDER", "METHOD", "URL", "RESULT", "ATTEMPTS", "REPLAYED")]
    for letter in letters:
        e, r = letter.entry, letter.replay
        attempts = e.get("attempts")
        replayed = f"{r.get('time', '?')} -> {r.get('status')}" if r else "-"
        rows.append(
            (
                letter.id, str(e.get("time", "?")), str(e.get("provider") or "-"), str(e["method"]),
                _cut(str(e["url"]), 60), letter.outcome, str(len(attempts) if isinstance(attempts, list) else "?"),
                replayed,
            )
        )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
