"""The server's log lines: every value quoted (`key=value` text, or one JSON object per line),
and repeated lines of one kind aggregated, so that no client can forge a line or fill the disk.

Theory of operation. Every call site logs a template of `key=value` pairs whose values are
%-placeholders or fixed words: `log.info("event=auth.refused conn=%d reason=%r", n, reason)`.
`KeyValueFormatter` and `JsonFormatter` parse the template once (cached) into its keys and
render each value themselves, instead of letting %-formatting paste client-controlled text
(a token's `sub`, an Origin header) into the line:

- text: a value made only of safe characters (letters, digits, `._:/@+-[],`) is written bare;
  any other is written as a double-quoted JSON string in which every character that is not
  printable (newlines, other controls, bidi overrides such as U+202E, lone surrogates) is a
  `\\uXXXX` escape. So one record is always one line, and what a value holds cannot look like
  another key or another line. A traceback follows on lines that start with `  | `.
- json: `{"time", "level", "event", <the template's keys>, "exc"?}`, ASCII only.
- Records that are not such a template (another library's) become `msg="..."`.

`Throttle` (a logging.Filter) lets each kind of line (logger, level, template, exception type and
the values of `reason`, `code` and `status`, not the connection number or address) through at
`RATE` lines per second after a burst of `BURST`, and counts the rest; a line of that kind that
gets through at least `REPORT_EVERY` seconds after the last count is preceded by
`event=log.suppressed of=<event> count=<n>` (and what is left is counted at shutdown). So a
client that repeats an error thousands of times a second writes a bounded trickle, and the
counts say how much it tried.
"""

from __future__ import annotations

import json
import logging
import re
import time
from functools import lru_cache
from typing import Any, Callable

TEXT, JSON = "text", "json"
FORMATS = (TEXT, JSON)
BURST = 100  # lines of one kind let through at once
RATE = 10.0  # lines of one kind per second after the burst
REPORT_EVERY = 10.0  # seconds between two counts of one kind's suppressed lines
KIND_KEYS = frozenset({"reason", "code", "status"})  # values that make two lines different kinds
MAX_KINDS = 10_000  # kinds remembered (the oldest idle ones are forgotten first)

_SAFE = re.compile(r"[A-Za-z0-9_.:/@+\-\[\],]+\Z")
_PAIR = re.compile(r"([A-Za-z_][\w.]*)=(%[-#0 +]*\d*(?:\.\d+)?[sdrif]|'[^']*'|\"[^\"]*\"|[^\s%]+)")


@lru_cache(maxsize=256)
def parse_template(template: str) -> tuple[tuple[str, str | None], ...] | None:
    """The (key, fixed value or None for a placeholder) pairs of a `key=value ...` template; None
    if `template` is not one (then the record is logged as a plain message)."""
    pairs = []
    pos = 0
    for match in _PAIR.finditer(template):
        if template[pos:match.start()].strip():
            return None
        key, value = match.groups()
        if value.startswith("%"):
            pairs.append((key, None))
        else:
            pairs.append((key, value.strip("'\"")))
        pos = match.end()
    if template[pos:].strip() or not pairs:
        return None
    return tuple(pairs)


def fields(record: logging.LogRecord) -> dict[str, Any] | None:
    """The record's keys and values (placeholders filled with the raw arguments), or None."""
    if not isinstance(record.msg, str):
        return None
    pairs = parse_template(record.msg)
    if pairs is None:
        return None
    args = record.args if isinstance(record.args, tuple) else (record.args,) if record.args else ()
    if sum(value is None for _, value in pairs) != len(args):
        return None
    values = iter(args)
    return {key: next(values) if value is None else value for key, value in pairs}


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def printable(text: str) -> str:
    """`text` with every character that is not printable (controls, bidi overrides, line and
    paragraph separators, lone surrogates) as a \\uXXXX escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def quote(value: Any) -> str:
    """One value as it appears after `key=`: bare if it is safe, else a quoted JSON string."""
    if value is None:
        return "-"
    if isinstance(value, (bool, int, float)):
        return str(value).lower() if isinstance(value, bool) else str(value)
    text = value if isinstance(value, str) else str(value)
    if _SAFE.match(text):
        return text
    return printable(json.dumps(text, ensure_ascii=False))


def _traceback(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    if not record.exc_info:
        return ""
    if not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    return record.exc_text


class KeyValueFormatter(logging.Formatter):
    """`TIME LEVEL key=value ...`, every value quoted (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        found = fields(record)
        if found is None:
            body = f"logger={quote(record.name)} msg={quote(record.getMessage())}"
        else:
            body = " ".join(f"{key}={quote(value)}" for key, value in found.items())
        line = f"{self.formatTime(record)} {record.levelname} {body}"
        trace = _traceback(self, record)
        if trace:
            line += "".join(f"\n  | {printable(part)}" for part in trace.splitlines())
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line (ASCII only): time, level, event, the template's keys, exc."""

    def format(self, record: logging.LogRecord) -> str:
        moment = time.gmtime(record.created)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", moment) + f".{int(record.msecs):03d}Z"
        out: dict[str, Any] = {"time": stamp, "level": record.levelname}
        found = fields(record)
        if found is None:
            out["logger"] = record.name
            out["msg"] = record.getMessage()
        else:
            for key, value in found.items():
                out.setdefault(key, value)
        trace = _traceback(self, record)
        if trace:
            out["exc"] = trace
        return json.dumps(out, ensure_ascii=True, default=str)


def formatter(kind: str) -> logging.Formatter:
    """The formatter of `--log-format` (text or json)."""
    if kind == JSON:
        return JsonFormatter()
    if kind == TEXT:
        return KeyValueFormatter()
    raise ValueError(f"log format must be one of {', '.join(FORMATS)}")


class Throttle(logging.Filter):
    """Each kind of line at most BURST at once, then RATE per second; the rest are counted and
    reported by the next line of that kind that gets through (see the module docstring)."""

    def __init__(self, burst: int = BURST, rate: float = RATE, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.burst = burst
        self.rate = rate
        self.clock = clock
        self._kinds: dict[tuple, list] = {}  # kind -> [tokens, last refill, suppressed, last report]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == __name__:
            return True  # our own summaries
        kind = _kind(record)
        now = self.clock()
        state = self._kinds.pop(kind, None)  # re-inserted last: dict order is least recently used
        if state is None:
            if len(self._kinds) >= MAX_KINDS:
                del self._kinds[next(iter(self._kinds))]
            state = [float(self.burst), now, 0, now]
        self._kinds[kind] = state
        state[0] = min(float(self.burst), state[0] + (now - state[1]) * self.rate)
        state[1] = now
        if state[0] < 1:
            state[2] += 1
            return False
        state[0] -= 1
        if state[2] and now - state[3] >= REPORT_EVERY:
            self._report(kind, state, now)
        return True

    def flush(self) -> None:
        """Report every count not reported yet (at shutdown)."""
        now = self.clock()
        for kind, state in list(self._kinds.items()):
            if state[2]:
                self._report(kind, state, now)

    @staticmethod
    def _report(kind: tuple, state: list, now: float) -> None:
        name, level, template = kind[:3]
        event = (parse_template(template) or (("event", name),))[0][1] or name
        _summary.log(level, "event=log.suppressed of=%s count=%d", event, state[2])
        state[2] = 0
        state[3] = now


_summary = logging.getLogger(__name__)


def _kind(record: logging.LogRecord) -> tuple:
    found = fields(record) or {}
    exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
    return (record.name, record.levelno, record.msg if isinstance(record.msg, str) else repr(record.msg), exc,
            tuple(str(found[key])[:64] for key in sorted(KIND_KEYS & found.keys())))


def install(level: int, kind: str = TEXT, stream: Any = None) -> logging.Handler:
    """Send the root logger's records to `stream` (stderr) through the formatter of `kind` and
    the throttle; returns the handler."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(kind))
    handler.addFilter(Throttle())
    _handlers.append(handler)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


_handlers: list[logging.Handler] = []  # installed by `install`


def flush_suppressed() -> None:
    """Report what every installed throttle has suppressed and not reported yet."""
    for handler in _handlers:
        for throttle in handler.filters:
            if isinstance(throttle, Throttle):
                throttle.flush()
