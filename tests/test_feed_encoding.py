"""The feed's two encoders (Python for fresh commits, SQLite for catch-up reads) give the same bytes,
and the fast redaction of a stock move gives the bytes of its plain twin."""

import json
import tempfile
from pathlib import Path

from hypothesis import given, settings, strategies as st

from orderlog.domain import Command, Principal
from orderlog.canonical import dumps
from orderlog.feed import FEED_COLUMNS, Channel, _tail, feed_event, redact_tail, redact_tail_slowly
from orderlog.store.feedreads import read_feed, read_frames
from orderlog.records import Request
from orderlog.store import Store

# Any text without lone surrogates (the protocol refuses those), control characters included.
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=64)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=8))
def test_sql_and_python_encodings_agree(pairs):
    """For any actor and command id, the rows a batch returns are the rows stored, and the catch-up
    frame bytes equal the live ones, and parse back."""
    with tempfile.TemporaryDirectory() as folder:
        store = Store.open(str(Path(folder) / "f.db"), create=True)
        try:
            requests = [Request(Principal(actor, "staff"), Command("add_stock", command_id,
                                                                   data={"sku": "k", "quantity": 1, "name": actor}),
                                "2026-11-25T17:03:00.123Z")
                        for actor, command_id in pairs]
            appended = store.execute_batch(requests).appended
            head = store.head()
            rows = store.conn.execute(f"SELECT {FEED_COLUMNS} FROM events ORDER BY seq").fetchall()
            assert appended == rows  # what the service publishes without a read is what was stored
            live = [feed_event(r) for r in appended]
            caught_up = read_feed(store.conn, None, 0, head, 1000)
            assert len(live) == len(caught_up) == head
            for a, b in zip(live, caught_up):
                assert (a.seq, a.stream, a.type, a.customer, a.order_id, bool(a.is_order), a.pre, a.mid, a.tail, a.hash) == \
                       (b.seq, b.stream, b.type, b.customer, b.order_id, bool(b.is_order), b.pre, b.mid, b.tail, b.hash)
                message = json.loads(b.payload(b'"inventory"', 0))
                row = rows[a.seq - 1]
                assert (message["actor"], message["command_id"]) == (row[5], row[6])
        finally:
            store.close()


def _subscriber_frames(events, channel, after, prev):
    """What the live path sends `channel` (FeedEvent.frame per visible event, prev chained)."""
    frames = []
    for event in events:
        if event.seq > after and channel.sees(event):
            frames.append(event.frame(channel.json_name, prev, channel.redacts(event)))
            prev = event.seq
    return frames, prev


@settings(max_examples=30, deadline=None)
@given(customers=st.lists(TEXT, min_size=1, max_size=3, unique=True),
       picks=st.lists(st.tuples(st.integers(0, 2), TEXT, st.booleans()), min_size=1, max_size=10),
       after=st.integers(0, 12), page=st.integers(1, 6))
def test_catch_up_frames_equal_the_live_frames(customers, picks, after, page):
    """read_frames (catch-up, encoded by SQLite) gives every channel, customer or staff, the
    same frame bytes, prev chain and redactions as the live path, page by page."""
    with tempfile.TemporaryDirectory() as folder:
        store = Store.open(str(Path(folder) / "f.db"), create=True)
        try:
            requests = [Request(Principal("staff-1", "staff"), Command("add_stock", "s0", data={"sku": "k", "quantity": 50}),
                                "2026-11-25T17:03:00.123Z")]
            for i, (who, command_id, place) in enumerate(picks):
                customer = customers[who % len(customers)]
                if place:
                    command = Command("place_order", command_id, order_id=f"o{i}", data={"items": [{"sku": "k", "quantity": 1}]})
                    requests.append(Request(Principal(customer, "customer"), command, "2026-11-25T17:03:01.000Z"))
                else:
                    command = Command("add_stock", command_id, data={"sku": f"k{i % 2}", "quantity": 1})
                    requests.append(Request(Principal("staff-1", "staff"), command, "2026-11-25T17:03:02.000Z"))
            store.execute_batch(requests)
            head = store.head()
            rows = store.conn.execute(f"SELECT {FEED_COLUMNS} FROM events ORDER BY seq").fetchall()
            events = [feed_event(r) for r in rows]
            principals = [Principal("staff-1", "staff")] + [Principal(c, "customer") for c in customers]
            names = ["orders", "inventory", "sku:k", "order:o0"]
            for principal in principals:
                for name in names:
                    channel = Channel(name, principal)
                    expected, _ = _subscriber_frames(events, channel, after, after)
                    got, cursor, prev = [], after, after
                    while True:  # page by page, as the send loop reads
                        frames, prev = read_frames(store.conn, channel, cursor, head, page, prev)
                        got.extend(frames)
                        if len(frames) < page:
                            break
                        cursor = prev
                    assert got == expected, (principal, name)
        finally:
            store.close()


ORDER_IDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-", min_size=1, max_size=64)
HASHES = st.binary(min_size=32, max_size=32).map(bytes.hex)


def _stock_move_tail(actor: str, command_id: str, order_id: str, hash_: str, quantity: int = 2) -> bytes:
    data = dumps({"sku": "kibble", "quantity": quantity, "order_id": order_id})
    return _tail("sku:kibble", 4, "2026-11-25T17:03:00.123Z", actor, command_id, data, hash_)


@settings(max_examples=200, deadline=None)
@given(TEXT, TEXT, ORDER_IDS, HASHES)
def test_fast_redaction_equals_the_plain_one(actor, command_id, order_id, hash_):
    """redact_tail (bytes cut in place) gives exactly the bytes of redact_tail_slowly (decode, edit,
    encode), for any actor and command id, and the result is the redacted event of docs/protocol.md."""
    tail = _stock_move_tail(actor, command_id, order_id, hash_)
    fast = redact_tail(tail)
    assert fast == redact_tail_slowly(tail)
    event = json.loads(b"{" + fast[1:])
    assert event == {"stream": "sku:kibble", "version": 4, "at": "2026-11-25T17:03:00.123Z", "actor": None,
                     "command_id": None, "data": {"quantity": 2, "sku": "kibble"}, "hash": None, "redacted": True}


@settings(max_examples=100, deadline=None)
@given(st.tuples(TEXT, TEXT, ORDER_IDS, HASHES), st.tuples(TEXT, TEXT, ORDER_IDS, HASHES))
def test_a_redacted_frame_does_not_depend_on_who_or_which_order(first, second):
    """Two stock moves that differ only in actor, command id, order id and hash reach a customer as
    the same bytes: nothing in the frame tells the customer who it was, or confirms a guess."""
    assert redact_tail(_stock_move_tail(*first)) == redact_tail(_stock_move_tail(*second))
