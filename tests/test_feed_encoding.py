"""The feed's two encoders (Python for fresh commits, SQLite for catch-up reads) give the same bytes."""

import json
import tempfile
from pathlib import Path

from hypothesis import given, settings, strategies as st

from orderlog.domain import Command, Principal
from orderlog.feed import FEED_COLUMNS, feed_event, read_feed
from orderlog.store import Request, Store

# Any text without lone surrogates (the protocol refuses those), control characters included.
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=64)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=8))
def test_sql_and_python_encodings_agree(pairs):
    """For any actor and command id, the catch-up frame bytes equal the live ones, and parse back."""
    with tempfile.TemporaryDirectory() as folder:
        store = Store.open(str(Path(folder) / "f.db"), create=True)
        try:
            requests = [Request(Principal(actor, "staff"), Command("add_stock", command_id,
                                                                   data={"sku": "k", "quantity": 1, "name": actor}),
                                "2026-11-25T17:03:00.123Z")
                        for actor, command_id in pairs]
            store.execute_batch(requests)
            head = store.head()
            rows = store.conn.execute(f"SELECT {FEED_COLUMNS} FROM events ORDER BY seq").fetchall()
            live = [feed_event(r) for r in rows]
            caught_up = read_feed(store.conn, None, 0, head, 1000)
            assert len(live) == len(caught_up) == head
            for a, b in zip(live, caught_up):
                assert (a.seq, a.stream, a.type, a.owner, a.order_id, bool(a.is_order), a.pre, a.mid, a.tail) == \
                       (b.seq, b.stream, b.type, b.owner, b.order_id, bool(b.is_order), b.pre, b.mid, b.tail)
                message = json.loads(b.payload(b'"inventory"', 0))
                row = rows[a.seq - 1]
                assert (message["actor"], message["command_id"]) == (row[5], row[6])
        finally:
            store.close()
