"""The server's log: no value can forge a line (newlines, quotes, bidi controls are escaped),
`--log-format json` writes one JSON object per line, and a client repeating an error cannot
write an unbounded volume of lines."""

from __future__ import annotations

import io
import json
import logging
import re
import time

import trio
from hypothesis import given
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from orderlog.service import logs
from test_crash import ServerProcess
from wsclient import connect, recv_json, send_json, token

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \S")
FORGED_SUB = "mallory\n2026-12-03 08:00:00,000 INFO event=connection.auth conn=1 user=root role=staff"
BIDI_SUB = "eve\u202e\u2066nimda\u2069 user=root"


def _record(template: str, *args, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("orderlog", logging.INFO, __file__, 1, template, args, exc_info)


@given(value=st.text())
def test_a_quoted_value_is_one_printable_word_that_reads_back(value):
    """Whatever a value holds, `key=value` stays one line and one word, and the quoted form reads back exactly."""
    text = logs.quote(value)
    assert text.isprintable() and "\n" not in text
    if text.startswith('"'):
        assert json.loads(text) == value
    else:
        assert " " not in text and (text == value or (value is None and text == "-"))


@given(value=st.text())
def test_the_text_formatter_writes_one_line_per_record_with_every_key(value):
    line = logs.KeyValueFormatter().format(_record("event=connection.auth conn=%d user=%s role=%s", 1, value, "staff"))
    assert "\n" not in line and line.isprintable()
    assert line.endswith(" role=staff") and " event=connection.auth conn=1 user=" in line


@given(value=st.text())
def test_the_json_formatter_writes_one_ascii_object_per_record(value):
    line = logs.JsonFormatter().format(_record("event=auth.refused conn=%d reason=%r", 2, value))
    assert "\n" not in line and line.isascii()
    assert json.loads(line) | {"time": None} == {"time": None, "level": "INFO", "event": "auth.refused", "conn": 2,
                                                 "reason": value}


def test_a_traceback_is_set_apart_and_escaped():
    try:
        raise ValueError("boom\nevent=forged user=root\u202e")
    except ValueError:
        import sys

        record = _record("event=connection.crashed conn=%d", 3, exc_info=sys.exc_info())
    lines = logs.KeyValueFormatter().format(record).splitlines()
    assert lines[0].endswith("ERROR event=connection.crashed conn=3") or "event=connection.crashed conn=3" in lines[0]
    assert all(line.startswith("  | ") for line in lines[1:]) and len(lines) > 2
    assert "\u202e" not in "".join(lines)


def test_throttle_lets_a_burst_through_then_a_rate_and_reports_what_it_dropped():
    now = [0.0]
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.KeyValueFormatter())
    handler.addFilter(logs.Throttle(burst=5, rate=2.0, clock=lambda: now[0]))
    logger = logging.getLogger("orderlog.test-throttle")
    logger.propagate = False
    logger.addHandler(handler)
    summary = logging.getLogger(logs.__name__)
    summary.addHandler(handler)
    try:
        for conn in range(100):
            logger.warning("event=auth.refused conn=%d reason=%r", conn, "invalid token")
        logger.warning("event=auth.refused conn=%d reason=%r", 0, "token expired")  # another kind
        now[0] = 1.0  # two more lines of the first kind are allowed, not counted yet (within REPORT_EVERY)
        for conn in range(100, 110):
            logger.warning("event=auth.refused conn=%d reason=%r", conn, "invalid token")
        now[0] = 1.0 + logs.REPORT_EVERY  # the count comes with the next line through
        logger.warning("event=auth.refused conn=%d reason=%r", 200, "invalid token")
    finally:
        logger.removeHandler(handler)
        summary.removeHandler(handler)
    lines = out.getvalue().splitlines()
    refused = [line for line in lines if "event=auth.refused" in line and "invalid token" in line]
    assert len(refused) == 5 + 2 + 1
    assert sum("token expired" in line for line in lines) == 1
    assert [line.split(" ", 3)[3] for line in lines if "log.suppressed" in line] == [
        "event=log.suppressed of=auth.refused count=103"]


# -- over a real socket ------------------------------------------------------------------------


async def _connect_as(url: str, sub: str) -> None:
    async with connect(url, token(sub)) as ws:
        assert (await recv_json(ws))["type"] == "welcome"
        await send_json(ws, {"type": "ping", "id": "p"})
        assert (await recv_json(ws))["type"] == "pong"


def test_a_sub_with_a_newline_or_bidi_controls_cannot_forge_a_log_line(tmp_path):
    """Every line the server writes starts with its time and level; the hostile `sub` is one quoted value."""
    with ServerProcess(tmp_path / "o.db") as server:
        url = server.wait_url()
        trio.run(_connect_as, url, FORGED_SUB)
        trio.run(_connect_as, url, BIDI_SUB)
        assert server.stop() == 0
    lines = server.stderr.splitlines()
    assert all(LINE.match(line) for line in lines), [line for line in lines if not LINE.match(line)]
    assert not [line for line in lines if " user=root" in line.split('"', 1)[0]]  # outside a quoted value
    assert "\u202e" not in server.stderr and "\u2066" not in server.stderr
    auth_lines = [line for line in lines if line.split(" ", 3)[3].startswith("event=connection.auth ")]
    assert len(auth_lines) == 2
    assert f"user={json.dumps(FORGED_SUB)}" in auth_lines[0]
    assert "user=\"eve\\u202e\\u2066nimda\\u2069 user=root\"" in auth_lines[1]


def _json_url(server: ServerProcess, timeout: float = 20.0) -> str:
    """The URL of the `listening` record (ServerProcess.wait_url looks for the text form)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(server.lines):
            record = json.loads(line)
            if record.get("event") == "listening":
                return record["url"]
        time.sleep(0.05)
    raise AssertionError(f"no listening record: {server.stderr[-2000:]}")


def test_log_format_json_writes_one_object_per_line(tmp_path):
    with ServerProcess(tmp_path / "o.db", "--log-format", "json") as server:
        url = _json_url(server)
        trio.run(_connect_as, url, FORGED_SUB)
        assert server.stop() == 0
    records = [json.loads(line) for line in server.stderr.splitlines()]
    assert {"listening", "connection.open", "connection.auth", "connection.close", "stopped"} <= {
        r.get("event") for r in records}
    (auth,) = [r for r in records if r.get("event") == "connection.auth"]
    assert auth["user"] == FORGED_SUB and auth["role"] == "customer" and isinstance(auth["conn"], int)


async def _refused_many(url: str, count: int) -> None:
    for _ in range(count):
        async with connect(url) as ws:
            await send_json(ws, {"type": "auth", "token": "\ud800"})
            try:
                await recv_json(ws)
            except ConnectionClosed as exc:
                assert exc.reason.code == 4001


def test_repeated_identical_errors_write_a_bounded_number_of_lines(tmp_path):
    """300 refused tokens in a row: at most the burst plus the rate's lines; the rest are counted."""
    with ServerProcess(tmp_path / "o.db") as server:
        url = server.wait_url()
        started = time.monotonic()
        trio.run(_refused_many, url, 300)
        elapsed = time.monotonic() - started
        assert server.stop() == 0
    lines = server.stderr.splitlines()
    refused = [line for line in lines if "event=auth.refused" in line]
    counts = [int(line.rsplit("count=", 1)[1]) for line in lines if "event=log.suppressed of=auth.refused" in line]
    assert "Traceback" not in server.stderr
    assert len(refused) <= logs.BURST + logs.RATE * (elapsed + 1), (len(refused), elapsed)
    assert len(refused) + sum(counts) == 300  # every refusal is a line or counted (flushed at shutdown)
