"""Canonical forms: the stored time format, canonical JSON, the event hash and the event's
JSON object (docs/protocol.md). Pure: used by the store, the feed, the CLI and the clients."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from .domain import Event

ZERO_HASH = bytes(32)  # the `prev_hash` of event 1


# -- time and canonical forms ----------------------------------------------------------------


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with milliseconds and a Z, the form of every stored `at`."""
    m = moment.astimezone(timezone.utc)  # four-digit years (strftime's %Y writes 987), so text order is time order
    return f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}.{m.microsecond // 1000:03d}Z"


def parse_time(text: str) -> datetime:
    """Parse an RFC 3339 time with an offset; ValueError if malformed."""
    if not isinstance(text, str) or not re.match(r"^\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)\Z", text):
        raise ValueError(f"not an RFC 3339 time with an offset: {text!r}")
    try:
        moment = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
        return moment.astimezone(timezone.utc)
    except OverflowError:  # 0001-01-01T00:00:00+23:59 is before year 1 in UTC
        raise ValueError(f"time out of range: {text!r}") from None


def time_bound(text: str) -> str:
    """A filter time as the stored form, rounded up to the millisecond.

    Stored times have millisecond precision, so `at >= t` equals `at >= ceil_ms(t)` and
    `at < t` equals `at < ceil_ms(t)`: string comparison then compares instants.
    """
    moment = parse_time(text)
    if moment.microsecond % 1000:
        try:
            moment += timedelta(microseconds=1000 - moment.microsecond % 1000)
        except OverflowError:  # 9999-12-31T23:59:59.9999Z rounds up past year 9999
            raise ValueError(f"time out of range: {text!r}") from None
    return format_time(moment)


# One encoder for every canonical text: json.dumps with these arguments would build a new
# JSONEncoder per call, which is a measurable part of an append.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
json_string = json.encoder.encode_basestring  # a JSON string literal, as _CANONICAL writes it for a str (ensure_ascii=False)


def dumps(value: Any) -> str:
    """The canonical JSON text: sorted keys, no spaces, UTF-8 as is."""
    return _CANONICAL.encode(value)


# The same C encoder that `_CANONICAL.encode` builds per call, built once. It skips the check
# for circular references, so it is only for values the domain validated (plain JSON types).
_VALIDATED_ENCODER = (
    json.encoder.c_make_encoder(None, _CANONICAL.default, json_string, None, ":", ",", True, False, True)
    if json.encoder.c_make_encoder is not None
    else None
)


def dumps_validated(value: Any) -> str:
    """`dumps` for event data and projections on the append path (no cycles possible there)."""
    if _VALIDATED_ENCODER is None:
        return dumps(value)
    return "".join(_VALIDATED_ENCODER(value, 0))


def event_hash(prev_hash: bytes, event: Event) -> str:
    """`sha256(prev_hash + canonical(event))`, hex (docs/protocol.md section 5)."""
    body = {
        "seq": event.seq,
        "stream": event.stream,
        "version": event.version,
        "type": event.type,
        "at": event.at,
        "actor": event.actor,
        "command_id": event.command_id,
        "data": event.data,
    }
    return hashlib.sha256(prev_hash + dumps(body).encode()).hexdigest()


def event_json(event: Event) -> dict[str, Any]:
    """The EVENT object of docs/protocol.md (in `result` and the JSONL export)."""
    return {
        "type": event.type,
        "seq": event.seq,
        "stream": event.stream,
        "version": event.version,
        "at": event.at,
        "actor": event.actor,
        "command_id": event.command_id,
        "data": event.data,
        "hash": event.hash,
    }




# The EVENT object's keys and the JSON type of each.
_EVENT_FIELDS = {"type": str, "seq": int, "stream": str, "version": int, "at": str, "actor": str,
                 "command_id": str, "data": dict, "hash": str}
_KIND_NAMES = {int: "an integer", str: "a string", dict: "an object"}
EVENT_KEYS = frozenset(_EVENT_FIELDS)


def event_from_json(value: Any) -> Event:
    """The Event of an EVENT object (a JSONL export line, a `result` entry).

    ValueError unless it is an object with exactly the EVENT keys, each of its JSON type. The
    values are taken as they are: checking them is the chain's job (a changed value fails its
    hash).
    """
    if not isinstance(value, dict) or set(value) != EVENT_KEYS:
        keys = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise ValueError(f"expected the keys {', '.join(sorted(EVENT_KEYS))}; got {keys}")
    for key, kind in _EVENT_FIELDS.items():
        if type(value[key]) is not kind:
            raise ValueError(f"{key} is not {_KIND_NAMES[kind]}")
    return Event(value["seq"], value["stream"], value["version"], value["type"], value["at"], value["actor"],
                 value["command_id"], value["data"], value["hash"])
