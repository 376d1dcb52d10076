"""docs/asyncapi.yaml: complete against the code's own tables, and strict enough to catch a wrong frame.

Every frame that the live-service tests read through `tests/wsclient.py` is checked against the
document (tests/frameschema.py). These tests check the checker: the document names every
message, command, event type and request field the code knows, the frames the protocol
promises (v1.2 included: snapshot, anchor, as_of, redacted, head_hash) conform, and frames that
break a rule do not.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

import frameschema
from frameschema import check_server_frame, document, errors, message_of, NonConformingFrame
from orderlog import domain, protocol
from wsclient import EVENT_TYPES

HASH = "ab" * 32
AT = "2026-11-25T17:03:00.123Z"
ORDER = {"order_id": "o-17", "customer": "u-42", "status": "placed", "items": [{"sku": "kibble", "quantity": 2}],
         "ship_to": None, "note": "ring twice", "version": 2, "created_at": AT, "updated_at": AT, "last_seq": 125}
STOCK = {"sku": "kibble", "name": None, "available": 5, "reserved": 2, "version": 3, "last_seq": 125}


def event(type_: str = "stock-reserved", **fields) -> dict:
    """A subscription event frame as PROTOCOL.md section 2 shows it."""
    data = {"stock-reserved": {"sku": "kibble", "quantity": 2, "order_id": "o-17"},
            "order-created": {"customer": "u-42", "items": [{"sku": "kibble", "quantity": 2}]},
            "order-approved": {}}[type_]
    stream = "sku:kibble" if type_.startswith("stock-") else "order:o-17"
    frame = {"type": type_, "channel": "orders", "seq": 124, "prev": 97, "stream": stream, "version": 1, "at": AT,
             "actor": "u-42", "command_id": "c-9", "data": data, "hash": HASH}
    frame.update(fields)
    return frame


def redacted() -> dict:
    """A stock move of another customer's order, as a customer on `inventory` gets it (v1.2)."""
    return event("stock-reserved", channel="inventory", redacted=True, actor=None, command_id=None, hash=None,
                 data={"sku": "kibble", "quantity": 2})


CONFORMING = [
    {"type": "welcome", "user": "alice", "role": "customer", "head": 0, "log_id": "abc", "expires_at": "2026-11-25T18:00:00Z",
     "head_hash": None},
    {"type": "welcome", "id": "a-1", "user": "s1", "role": "staff", "head": 42, "log_id": "abc",
     "expires_at": "2026-11-25T18:00:00Z", "head_hash": HASH},
    {"type": "subscribed", "id": "r-1", "channel": "orders", "since": 0, "head": 7},
    {"type": "subscribed", "id": "r-2", "channel": "inventory", "since": 7, "head": 7, "snapshot": True},
    {"type": "snapshot", "channel": "orders", "seq": 7, "rows": [ORDER], "last": False, "total": 2},
    {"type": "snapshot", "channel": "order:o-17", "seq": 7, "rows": [ORDER], "last": True},
    {"type": "snapshot", "channel": "inventory", "seq": 7, "rows": [STOCK], "last": True, "total": 1},
    {"type": "snapshot", "channel": "inventory", "seq": 7, "rows": [], "last": True},
    {"type": "live", "channel": "order:o-17", "seq": 9},
    {"type": "unsubscribed", "channel": "order:o-17"},
    {"type": "pong", "id": "p", "head": 3, "head_hash": HASH},
    {"type": "ack", "id": "c-1", "seq": 3, "version": 1, "events": ["order-created", "stock-reserved"], "duplicate": False},
    {"type": "error", "id": "c-2", "code": "conflict", "message": "version", "details": {"current_version": 4}},
    {"type": "error", "code": "bad_request", "message": "not valid JSON"},
    {"type": "order", "id": "g", "order": ORDER},
    {"type": "stock", "id": "g", "stock": STOCK},
    {"type": "result", "id": "q", "events": [{k: v for k, v in event().items() if k not in ("channel", "prev")}],
     "next": None},
    event(), event("order-created"), event("order-approved", version=2), redacted(),
]

NOT_CONFORMING = [
    ("an unknown type", {"type": "hello"}),
    ("welcome without log_id", {"type": "welcome", "user": "a", "role": "customer", "head": 0,
                                "expires_at": "2026-11-25T18:00:00Z"}),
    ("welcome without head_hash", {"type": "welcome", "user": "a", "role": "customer", "head": 0, "log_id": "x",
                                   "expires_at": "2026-11-25T18:00:00Z"}),
    ("pong without head_hash", {"type": "pong", "head": 3}),
    ("an undocumented field", {"type": "pong", "head": 3, "head_hash": None, "extra": 1}),
    ("a role that does not exist", {"type": "welcome", "user": "a", "role": "admin", "head": 0, "log_id": "x",
                                    "expires_at": "2026-11-25T18:00:00Z"}),
    ("expires_at not in UTC", {"type": "welcome", "user": "a", "role": "staff", "head": 0, "log_id": "x",
                               "expires_at": "2026-11-25T18:00:00+01:00"}),
    ("head_hash not hex", {"type": "pong", "head": 3, "head_hash": "xyz"}),
    ("an unknown error code", {"type": "error", "code": "oops", "message": "m"}),
    ("an ack with no events", {"type": "ack", "id": "c", "seq": 1, "version": 1, "events": [], "duplicate": False}),
    ("an event without prev", {k: v for k, v in event().items() if k != "prev"}),
    ("a stock move without order_id, not redacted", event(data={"sku": "kibble", "quantity": 2})),
    ("a redacted event with a hash", {**redacted(), "hash": HASH}),
    ("a redacted event naming the order", {**redacted(), "data": {"sku": "kibble", "quantity": 2, "order_id": "o-1"}}),
    ("a redacted event naming the actor", {**redacted(), "actor": "bob"}),
    ("order data on a sku stream", event("order-created", stream="sku:kibble")),
    ("order-approved with data", event("order-approved", data={"x": 1})),
    ("a snapshot row of the wrong shape", {"type": "snapshot", "channel": "inventory", "seq": 7, "rows": [ORDER],
                                           "last": True}),
    ("a snapshot without last", {"type": "snapshot", "channel": "orders", "seq": 7, "rows": []}),
    ("an order with a status that does not exist", {"type": "order", "order": {**ORDER, "status": "lost"}}),
    ("an EVENT in a result with a channel", {"type": "result", "events": [event()], "next": None}),
]


@pytest.mark.parametrize("frame", CONFORMING, ids=lambda f: f["type"])
def test_protocol_frames_conform(frame: dict) -> None:
    """Frames written as PROTOCOL.md v1.2 describes them conform to the document."""
    check_server_frame(frame)


@pytest.mark.parametrize("why, frame", NOT_CONFORMING, ids=[why for why, _ in NOT_CONFORMING])
def test_wrong_frames_do_not_conform(why: str, frame: dict) -> None:
    """A frame that breaks one rule of the protocol is refused, naming what is wrong."""
    with pytest.raises(NonConformingFrame):
        check_server_frame(frame)


@given(st.sampled_from(CONFORMING), st.text(min_size=1, max_size=12).filter(lambda k: k not in ("type",)))
def test_any_extra_field_is_refused(frame: dict, key: str) -> None:
    """The server promises no field beyond the document's: any other top-level key fails."""
    frame = copy.deepcopy(frame)
    if key in frame:
        return
    frame[key] = 1
    assert errors(frame)


def test_the_document_names_everything_the_code_knows() -> None:
    """Every event type, command, role and request field of the code is in the document, and every message is reachable."""
    doc = document()
    assert doc["asyncapi"].startswith("3.")
    schemas, messages = doc["components"]["schemas"], doc["components"]["messages"]
    assert set(schemas["EventType"]["enum"]) == set(domain.EVENT_TYPES) == EVENT_TYPES
    assert set(schemas["CommandName"]["enum"]) == set(domain.COMMANDS)
    assert set(schemas["Role"]["enum"]) == set(domain.ROLES)
    assert set(schemas["ErrorCode"]["enum"]) == set(domain.ERROR_CODES)
    assert set(schemas["Status"]["enum"]) == {v for k, v in vars(domain.Status).items() if k.isupper()}
    assert re.compile(schemas["Channel"]["pattern"]).pattern.strip("^$") in protocol.CHANNEL_RE.pattern
    dispatch = doc["x-orderlog-dispatch"]
    assert set(dispatch["client"]) == set(protocol.REQUEST_FIELDS)
    for kind, fields in protocol.REQUEST_FIELDS.items():
        schema = schemas[messages[dispatch["client"][kind]]["payload"]["$ref"].rsplit("/", 1)[1]]
        assert fields | {"type", "id"} <= set(schema["properties"]), kind
    for kind in domain.EVENT_TYPES:
        assert message_of(kind) == "event"
    # PROTOCOL.md v1.2's server messages, section 6 included.
    assert {"welcome", "subscribed", "snapshot", "live", "unsubscribed", "pong", "ack", "error", "order", "stock",
            "result"} <= set(dispatch["server"])
    for name in messages:  # every $ref resolves and every payload is a valid draft 7 schema
        frameschema.validator(name)
    channel_messages = {ref["$ref"].rsplit("/", 1)[1] for ref in doc["channels"]["ws"]["messages"].values()}
    assert channel_messages == set(messages)
    assert set(dispatch["client"].values()) | set(dispatch["server"].values()) == set(messages)


def test_a_test_that_read_a_wrong_frame_fails_when_it_ends() -> None:
    """Frames recorded by wsclient.decode are checked at the end of the test: a wrong one among many, even of a new
    shape past the frames checked one by one, fails it."""
    from wsclient import decode

    good = json.dumps(event())
    for _ in range(frameschema.CHECK_ALL + 10):
        decode(good)
    decode(json.dumps({**redacted(), "hash": HASH}))  # a new shape (no null hash) that breaks the redaction rule
    with pytest.raises(NonConformingFrame, match="redacted|hash"):
        frameschema.check_recorded()
    decode(good)
    assert frameschema.check_recorded() == 1  # the record starts afresh
