"""The wire protocol, sans I/O: a text frame in -> a typed request or a ClientError; replies out.

Every frame is one UTF-8 JSON object with a string `type` (docs/protocol.md section 2). Parsing
is strict: a missing, mistyped or unknown field is a `bad_request` naming the field, so a
typo such as `sinse` is reported instead of silently meaning "live only". Nothing here
touches a socket, a clock or the database.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

import attrs

from .domain import ID_RE, Command, ErrorCode, Rejected
from .canonical import time_bound
from .records import Filter

MAX_QUERY_LIMIT = 1000
DEFAULT_QUERY_LIMIT = 100
REQUEST_ID_MAX = 64
MAX_SEQ = 2**63 - 1  # the largest seq SQLite can hold (INTEGER is 64-bit signed)
CHANNEL_RE = re.compile(r"^(orders|inventory|order:[A-Za-z0-9._-]{1,64})\Z")

# Every client request type and the fields it may carry (besides `type` and `id`).
REQUEST_FIELDS: dict[str, frozenset[str]] = {
    "auth": frozenset({"token"}),
    "subscribe": frozenset({"channel", "since", "log_id", "snapshot", "anchor"}),
    "unsubscribe": frozenset({"channel"}),
    "command": frozenset({"name", "order_id", "expected_version", "data"}),
    "get": frozenset({"order_id", "sku", "as_of", "anchor"}),
    "query": frozenset({"filter", "limit"}),
    "ping": frozenset(),
}
HASH_RE = re.compile(r"^[0-9a-f]{64}\Z")  # an event's `hash`: sha256, lowercase hex
FILTER_KEYS = ("stream", "order_id", "types", "actor", "after", "until", "from_time", "to_time")


class ClientError(Rejected):
    """A request refused before it reached the domain; `request_id` is echoed if known."""

    def __init__(self, code: str, message: str, request_id: str | None = None, details: Mapping | None = None):
        super().__init__(code, message, details)
        self.request_id = request_id


@attrs.frozen
class Auth:
    id: str | None
    token: Any  # validated by the auth layer: a missing or non-string token is `invalid token`


@attrs.frozen
class Anchor:
    """The newest event a resuming client holds with its hash (PROTOCOL.md section 6)."""

    seq: int
    hash: str


@attrs.frozen
class Subscribe:
    id: str | None
    channel: str
    since: int | None
    log_id: str | None
    snapshot: bool = False  # v1.2: the rows as of a seq first, then the events after it
    anchor: Anchor | None = None


@attrs.frozen
class Unsubscribe:
    id: str | None
    channel: str


@attrs.frozen
class CommandRequest:
    id: str
    command: Command


@attrs.frozen
class Get:
    id: str | None
    order_id: str | None
    sku: str | None
    as_of: int | None = None  # v1.2: the state right after this seq (None: now)
    anchor: Anchor | None = None  # the newest event the client holds with its hash (<= as_of)


@attrs.frozen
class Query:
    id: str | None
    filter: Filter
    limit: int


@attrs.frozen
class Ping:
    id: str | None


ClientRequest = Auth | Subscribe | Unsubscribe | CommandRequest | Get | Query | Ping


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_json_object(text: str | bytes) -> dict[str, Any]:
    """The frame as a JSON object, or `bad_request` (binary, not JSON, not an object)."""
    if isinstance(text, (bytes, bytearray)):
        raise ClientError(ErrorCode.BAD_REQUEST, "binary frames are not accepted: send one JSON object as a text frame")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ClientError(ErrorCode.BAD_REQUEST, f"not valid JSON: {_short(exc)}") from None
    if not isinstance(value, dict):
        raise ClientError(ErrorCode.BAD_REQUEST, f"a frame must be a JSON object, not {type(value).__name__}")
    return value


def _encodable(value: Any) -> bool:
    """Whether a reply could carry `value` back as UTF-8 (no lone surrogate in any string)."""
    try:
        if isinstance(value, str):
            value.isascii() or value.encode("utf-8")
        else:
            _ENCODER.encode(value).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def request_id(message: Mapping[str, Any]) -> str | None:
    """The request's `id` if it is one a reply can echo (a string of 1..64 characters, valid
    Unicode), else None."""
    value = message.get("id")
    if isinstance(value, str) and 1 <= len(value) <= REQUEST_ID_MAX and _encodable(value):
        return value
    return None


def parse_request(text: str | bytes) -> ClientRequest:
    """Parse one client frame into a typed request; raise ClientError with the code to send."""
    message = parse_json_object(text)
    request_id_ = request_id(message)
    if "id" in message and request_id_ is None:
        value = message["id"]
        if isinstance(value, str) and 1 <= len(value) <= REQUEST_ID_MAX:
            raise ClientError(ErrorCode.BAD_REQUEST,
                              "id must be valid Unicode (no lone surrogate escapes such as \\ud800)")
        raise ClientError(ErrorCode.BAD_REQUEST, f"id must be a string of 1..{REQUEST_ID_MAX} characters")
    kind = message.get("type")
    # A \uD800-style escape can smuggle a lone surrogate into a string, which no reply could
    # carry back as UTF-8 and no database could store: refuse it here, once, instead of failing
    # later. An `auth` frame is judged by its token alone (auth.verify refuses such a token).
    if (kind != "auth" and isinstance(text, str) and ("\\ud" in text or "\\uD" in text)
            and not _encodable(message)):
        raise ClientError(ErrorCode.BAD_REQUEST, "strings must be valid Unicode (no lone surrogate escapes)", request_id_)
    if not isinstance(kind, str):
        raise ClientError(ErrorCode.BAD_REQUEST, "every frame needs a string field type", request_id_)
    if kind not in REQUEST_FIELDS:
        raise ClientError(ErrorCode.UNKNOWN_TYPE, f"unknown type {kind[:64]!r}; expected one of {', '.join(REQUEST_FIELDS)}", request_id_)
    extra = sorted(set(message) - REQUEST_FIELDS[kind] - {"type", "id"})
    # An `auth` frame is judged by its token alone (a bad one closes with 4001 `invalid token`).
    if extra and kind != "auth":
        raise ClientError(ErrorCode.BAD_REQUEST, f"{kind}: unknown field {extra[0][:64]!r}", request_id_)
    return _PARSERS[kind](message, request_id_)


def _parse_auth(message: dict, request_id: str | None) -> Auth:
    return Auth(request_id, message.get("token"))


def _channel(message: dict, request_id: str | None) -> str:
    channel = message.get("channel")
    if not isinstance(channel, str) or not CHANNEL_RE.match(channel):
        raise ClientError(ErrorCode.BAD_REQUEST, "channel must be orders, inventory or order:<order_id>", request_id)
    return channel


def _parse_subscribe(message: dict, request_id: str | None) -> Subscribe:
    channel = _channel(message, request_id)
    since = message.get("since")
    if since is not None and (not _is_int(since) or since < 0):
        raise ClientError(ErrorCode.BAD_REQUEST, "since must be an integer >= 0", request_id)
    log_id = message.get("log_id")
    if log_id is not None and not isinstance(log_id, str):
        raise ClientError(ErrorCode.BAD_REQUEST, "log_id must be a string", request_id)
    snapshot = message.get("snapshot", False)
    if not isinstance(snapshot, bool):
        raise ClientError(ErrorCode.BAD_REQUEST, "snapshot must be true or false", request_id)
    if snapshot and since is not None:
        raise ClientError(ErrorCode.BAD_REQUEST, "snapshot and since exclude each other: a snapshot is for a client that "
                          "holds nothing; resume with since alone", request_id)
    anchor = _anchor(message.get("anchor"), since, "since", request_id) if "anchor" in message else None
    return Subscribe(request_id, channel, since, log_id, snapshot, anchor)


def _anchor(raw: Any, bound: int | None, bound_name: str, request_id: str | None) -> Anchor:
    """`anchor {seq, hash}`: an event (seq >= 1) at most `bound` (the request's `since` or
    `as_of`, the seq the client holds), which must be given."""
    if not isinstance(raw, dict):
        raise ClientError(ErrorCode.BAD_REQUEST, "anchor must be an object {seq, hash}", request_id)
    unknown = sorted(set(raw) - {"seq", "hash"})
    if unknown:
        raise ClientError(ErrorCode.BAD_REQUEST, f"anchor: unknown field {unknown[0][:64]!r}", request_id)
    seq, hash_ = raw.get("seq"), raw.get("hash")
    if not _is_int(seq) or seq < 1:
        raise ClientError(ErrorCode.BAD_REQUEST, "anchor.seq must be an integer >= 1", request_id)
    if not isinstance(hash_, str) or not HASH_RE.match(hash_):
        raise ClientError(ErrorCode.BAD_REQUEST, "anchor.hash must be an event hash (64 lowercase hex digits)", request_id)
    if bound is None:
        raise ClientError(ErrorCode.BAD_REQUEST, f"anchor needs {bound_name} (it names an event the client holds)",
                          request_id)
    if seq > bound:
        raise ClientError(ErrorCode.BAD_REQUEST, f"anchor.seq {seq} is beyond {bound_name} {bound}", request_id)
    return Anchor(seq, hash_)


def _parse_unsubscribe(message: dict, request_id: str | None) -> Unsubscribe:
    return Unsubscribe(request_id, _channel(message, request_id))


def _parse_command(message: dict, request_id: str | None) -> CommandRequest:
    if request_id is None:
        raise ClientError(ErrorCode.BAD_REQUEST, "a command needs an id (its idempotency key)")
    name = message.get("name")
    if not isinstance(name, str):
        raise ClientError(ErrorCode.BAD_REQUEST, "command: name must be a string", request_id)
    order_id = message.get("order_id")
    if order_id is not None and not isinstance(order_id, str):
        raise ClientError(ErrorCode.BAD_REQUEST, "order_id must be a string", request_id)
    expected = message.get("expected_version")
    if expected is not None and (not _is_int(expected) or expected < 0):
        raise ClientError(ErrorCode.BAD_REQUEST, "expected_version must be an integer >= 0", request_id)
    data = message.get("data", {})
    if not isinstance(data, dict):
        raise ClientError(ErrorCode.BAD_REQUEST, "data must be an object", request_id)
    return CommandRequest(request_id, Command(name, request_id, order_id, expected, data))


def _parse_get(message: dict, request_id: str | None) -> Get:
    order_id, sku = message.get("order_id"), message.get("sku")
    if (order_id is None) == (sku is None):
        raise ClientError(ErrorCode.BAD_REQUEST, "get needs exactly one of order_id, sku", request_id)
    value = order_id if sku is None else sku
    if not isinstance(value, str) or not ID_RE.match(value):
        which = "order_id" if sku is None else "sku"
        raise ClientError(ErrorCode.BAD_REQUEST, f"{which} must be 1..64 characters of [A-Za-z0-9._-]", request_id)
    as_of = message.get("as_of")
    if as_of is not None and (not _is_int(as_of) or as_of < 0):
        raise ClientError(ErrorCode.BAD_REQUEST, "as_of must be an integer >= 0", request_id)
    anchor = _anchor(message.get("anchor"), as_of, "as_of", request_id) if "anchor" in message else None
    return Get(request_id, order_id, sku, as_of, anchor)


def _parse_query(message: dict, request_id: str | None) -> Query:
    limit = message.get("limit", DEFAULT_QUERY_LIMIT)
    if not _is_int(limit) or not 1 <= limit <= MAX_QUERY_LIMIT:
        raise ClientError(ErrorCode.BAD_REQUEST, f"limit must be an integer from 1 to {MAX_QUERY_LIMIT}", request_id)
    raw = message.get("filter", {})
    if not isinstance(raw, dict):
        raise ClientError(ErrorCode.BAD_REQUEST, "filter must be an object", request_id)
    unknown = sorted(set(raw) - set(FILTER_KEYS))
    if unknown:
        raise ClientError(ErrorCode.BAD_REQUEST, f"filter: unknown key {unknown[0][:64]!r} (known: {', '.join(FILTER_KEYS)})", request_id)
    fields: dict[str, Any] = {}
    for key in ("stream", "order_id", "actor"):
        if key in raw:
            if not isinstance(raw[key], str):
                raise ClientError(ErrorCode.BAD_REQUEST, f"filter.{key} must be a string", request_id)
            fields[key] = raw[key]
    if "types" in raw:
        types = raw["types"]
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types) or len(types) > 100:
            raise ClientError(ErrorCode.BAD_REQUEST, "filter.types must be a list of strings", request_id)
        fields["types"] = tuple(types)
    for key in ("after", "until"):
        if key in raw:
            if not _is_int(raw[key]) or not 0 <= raw[key] <= MAX_SEQ:
                raise ClientError(ErrorCode.BAD_REQUEST, f"filter.{key} must be an integer from 0 to {MAX_SEQ}", request_id)
            fields[key] = raw[key]
    for key in ("from_time", "to_time"):
        if key in raw:
            try:
                fields[key] = time_bound(raw[key])
            except (ValueError, TypeError):
                raise ClientError(ErrorCode.BAD_REQUEST, f"filter.{key} must be an RFC 3339 time with an offset", request_id) from None
    return Query(request_id, Filter(**fields), limit)


def _parse_ping(message: dict, request_id: str | None) -> Ping:
    return Ping(request_id)


_PARSERS = {
    "auth": _parse_auth,
    "subscribe": _parse_subscribe,
    "unsubscribe": _parse_unsubscribe,
    "command": _parse_command,
    "get": _parse_get,
    "query": _parse_query,
    "ping": _parse_ping,
}


def _short(exc: BaseException) -> str:
    return str(exc)[:120]


# -- rendering -------------------------------------------------------------------------------


# json.dumps with these options would build a new encoder on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_EVENT_LISTS: dict[tuple[str, ...], str] = {}  # the `events` of an ack, rendered once per combination


def encode(message: Any) -> str:
    """One server frame: compact JSON, UTF-8 as is (what json.dumps(message,
    separators=(",", ":"), ensure_ascii=False) gives)."""
    return _ENCODER.encode(message)


def reply(kind: str, request_id: str | None, **fields: Any) -> str:
    """A reply frame of `kind`, echoing the request's id when it had one."""
    message: dict[str, Any] = {"type": kind}
    if request_id is not None:
        message["id"] = request_id
    message.update(fields)
    return encode(message)


def ack(request_id: str, seq: int, version: int, events: "tuple[str, ...] | list[str]", duplicate: bool) -> str:
    """An `ack` frame: the same text as reply("ack", ...) with these fields, built without a dict."""
    events = tuple(events)
    rendered = _EVENT_LISTS.get(events)
    if rendered is None:
        rendered = encode(list(events))
        if len(_EVENT_LISTS) < 1024:  # event types are a fixed set: few combinations
            _EVENT_LISTS[events] = rendered
    return (f'{{"type":"ack","id":{encode(request_id)},"seq":{int(seq)},"version":{int(version)},'
            f'"events":{rendered},"duplicate":{"true" if duplicate else "false"}}}')


def error(code: str, message: str, request_id: str | None = None, details: Mapping | None = None) -> str:
    """An `error` frame."""
    fields: dict[str, Any] = {"code": code, "message": message}
    if details:
        fields["details"] = dict(details)
    return reply("error", request_id, **fields)


def error_from(rejection: Rejected, request_id: str | None) -> str:
    return error(rejection.code, rejection.message, request_id, rejection.details)
