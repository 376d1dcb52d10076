"""Reading the projection as of a seq: snapshot pages and `get as_of` (PROTOCOL.md section 6).

A snapshot at seq N is read page by page, each page in its own short read (so a client that
stops reading holds no read transaction, and WAL checkpoints go on). The projection tables
move on meanwhile; a row is right as of N exactly when its `last_seq` is <= N (nothing
touched it since). A row with `last_seq` > N is folded again from its stream's events with
seq <= N (`orderlog.snapshot.order_as_of` / `stock_as_of`, the domain's own evolve), and
left out when that prefix is empty (the row did not exist at N). The first page, the count
and N itself come from one read transaction, so N is the head that page saw and its rows
need no such fold.

The rows are encoded as JSON by SQLite while it reads them (the same values as `Order.to_json`
/ `Stock.to_json`, `orderlog.snapshot.row_json` being the plain twin; tests/test_snapshot.py
pins them together).

Blocking SQLite queries: the service calls these from a worker thread. A PostgreSQL store's
reads are in `postgres/snapshots.py` (the public functions here hand them over).
"""

from __future__ import annotations

import sqlite3
from typing import Any

from ..domain import Order, Role, Stock
from ..feed import Channel
from ..snapshot import MAX_FRAME_BYTES, MAX_ROWS, order_as_of, row_json, stock_as_of
from .log import EVENT_COLUMNS, Store, row_to_event
from .projections import ORDER_COLUMNS, STOCK_COLUMNS, row_to_order, row_to_stock

# An order's items are stored as canonical JSON `[["sku",q],...]` and skus are made of
# [A-Za-z0-9._-] only, so the `items` shape `[{"sku":"sku","quantity":q},...]` is a few
# replacements of the text (json_each and json_group_array per row took twice as long).
# order_id, sku, status and the times need no escaping either (ids and stamps are checked on
# the way in); the customer (a token's subject), ship_to, note and name may be any string.
# One printf per row: 15-25% faster than the same text built with `||`.
_ORDER_JSON = """printf('{"order_id":"%s","customer":%s,"status":"%s","items":%s,"ship_to":%s,"note":%s,'
    || '"version":%d,"created_at":"%s","updated_at":"%s","last_seq":%d}',
    order_id, json_quote(customer), status,
    replace(replace(replace(replace(items, '",', '","quantity":'), '[[', '[{"sku":'), '],[', '},{"sku":'), ']]', '}]'),
    json_quote(ship_to), json_quote(note), version, created_at, updated_at, last_seq)"""
_STOCK_JSON = """printf('{"sku":"%s","name":%s,"available":%d,"reserved":%d,"version":%d,"last_seq":%d}',
    sku, json_quote(name), available, reserved, version, last_seq)"""


def _source(channel: Channel) -> tuple[str, str, str, list[Any]]:
    """(table, key column, row JSON expression, extra WHERE with its parameters) for a channel."""
    principal = channel.principal
    if channel.name == "inventory":
        return "stock", "sku", _STOCK_JSON, ["1"]
    where, params = ["1"], []
    if principal.role == Role.CUSTOMER:
        where, params = ["customer = ?"], [principal.user]
    if channel.name.startswith("order:"):
        where[0] += " AND order_id = ?"
        params.append(channel.name[6:])
    return "orders", "order_id", _ORDER_JSON, [*where, *params]


def _stream_events(conn: sqlite3.Connection, stream: str, seq: int) -> list:
    rows = conn.execute(f"SELECT {EVENT_COLUMNS} FROM events WHERE stream = ? AND seq <= ? ORDER BY seq",
                        (stream, seq))
    return [row_to_event(r) for r in rows]


def _order_at(conn: sqlite3.Connection, order_id: str, seq: int) -> Order | None:
    """The order right after event `seq` (None if it did not exist then)."""
    row = conn.execute(f"SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = ?", (order_id,)).fetchone()
    if row is None:
        return None
    order = row_to_order(row)
    if order.last_seq <= seq:
        return order  # unchanged since `seq`
    return order_as_of(_stream_events(conn, f"order:{order_id}", seq))


def _stock_at(conn: sqlite3.Connection, sku: str, seq: int) -> Stock | None:
    """The stock level right after event `seq` (None if the sku had no event by then)."""
    row = conn.execute(f"SELECT {STOCK_COLUMNS} FROM stock WHERE sku = ?", (sku,)).fetchone()
    if row is None:
        return None
    stock = row_to_stock(row)
    if stock.last_seq <= seq:
        return stock
    return stock_as_of(_stream_events(conn, f"sku:{sku}", seq))


def _count_at(conn: sqlite3.Connection, channel: Channel, seq: int) -> int:
    """How many rows the channel's snapshot at `seq` holds (inside the caller's read transaction)."""
    table, _, _, (where, *params) = _source(channel)
    now = conn.execute(f"SELECT count(*) FROM {table} WHERE {where}", params).fetchone()[0]
    # Rows created after `seq`: their stream's first event is later (a seq range, by primary key).
    if table == "stock":
        later = conn.execute("SELECT count(*) FROM events WHERE seq > ? AND version = 1 AND substr(stream, 1, 4) = 'sku:'",
                             (seq,)).fetchone()[0]
    else:
        clause, extra = "", []
        if channel.principal.role == Role.CUSTOMER:
            clause, extra = " AND owner = ?", [channel.principal.user]
        if channel.name.startswith("order:"):
            clause, extra = clause + " AND stream = ?", [*extra, channel.name]
        later = conn.execute(f"SELECT count(*) FROM events WHERE seq > ? AND type = 'order-created'{clause}",
                             [seq, *extra]).fetchone()[0]
    return now - later


READ_BYTES = 1024 * 1024  # rows' JSON read per step of a snapshot, about (see _read_page)
# Fits any frame's head (channel name up to 72 bytes, seq and total up to 20 digits each).
_FRAME_OVERHEAD = 200
_CHUNK_BYTES = (MAX_FRAME_BYTES - _FRAME_OVERHEAD) * 9 // 10  # what a chunk aims at: one frame, with room


def _read_page(conn: sqlite3.Connection, channel: Channel, seq: int, after: str, limit: int
               ) -> tuple[list[tuple[bytes, int]], str | None]:
    """Up to `limit` rows (and about READ_BYTES) of the channel's snapshot at `seq` with a key >
    `after`, in key order, as pieces (JSON text of `count` rows joined with commas, count); and
    the key to read on from (None: no more rows).

    Read in chunks of about one frame: at most MAX_ROWS rows, fewer when the rows read so far
    were big (so that one chunk of unusually big orders does not cost 1,000 of them in memory).
    """
    pieces: list[tuple[bytes, int]] = []
    left, size, rows = limit, 0, 0
    more: str | None = after
    chunk_rows = MAX_ROWS // 2  # until the first chunk tells how big this channel's rows are
    while left > 0 and more is not None and size < READ_BYTES:
        chunk, more = _read_chunk(conn, channel, seq, more, min(left, chunk_rows))
        pieces += chunk
        left -= min(left, chunk_rows)
        rows += sum(count for _, count in chunk)
        size += sum(len(text) for text, _ in chunk)
        if rows:  # about 90% of a frame, by the rows so far: nearly every chunk takes the fast path
            chunk_rows = max(1, min(MAX_ROWS, _CHUNK_BYTES * rows // max(size, 1)))
    return pieces, more


def _read_chunk(conn: sqlite3.Connection, channel: Channel, seq: int, after: str, limit: int
                ) -> tuple[list[tuple[bytes, int]], str | None]:
    """Up to `limit` (<= MAX_ROWS) rows after `after`, as pieces; and the key to read on from.

    Usually one piece: SQLite joins the rows itself (with the GIL released, so the other threads
    go on meanwhile). Rows that would not fit in one frame are read again, fewer of them (the
    caller's estimate aims at 90% of a frame, so this is rare). When a row changed after `seq`,
    or one row alone is too big for the fast path's checks, they are read again row by row.
    """
    table, key, expression, (where, *params) = _source(channel)
    text, newest, count, last_key = conn.execute(
        f"SELECT CAST(group_concat(j, ',') AS BLOB), max(last_seq), count(*), max(k) "
        f"FROM (SELECT {key} AS k, last_seq, {expression} AS j FROM {table} "
        f"WHERE {key} > ? AND {where} ORDER BY {key} LIMIT ?)", [after, *params, limit]).fetchone()
    if not count:
        return [], None
    size = len(text)  # the UTF-8 bytes of the rows and their commas
    more = last_key if count == limit else None
    if newest <= seq and count <= MAX_ROWS:
        if size + _FRAME_OVERHEAD <= MAX_FRAME_BYTES:
            return [(text, count)], more
        if count > 1:  # unchanged, only too big for one frame: read fewer rows, again in one piece
            return _read_chunk(conn, channel, seq, after, max(1, _CHUNK_BYTES * count // size))
    rows = conn.execute(
        f"SELECT {key}, last_seq, CAST({expression} AS BLOB) FROM {table} WHERE {key} > ? AND {where} "
        f"ORDER BY {key} LIMIT ?", [after, *params, limit]).fetchall()
    out = []
    for row_key, last_seq, row_text in rows:
        if last_seq > seq:  # changed since the snapshot's seq: fold it again from the log's prefix
            past = _order_at(conn, row_key, seq) if table == "orders" else _stock_at(conn, row_key, seq)
            if past is None:
                continue  # created after the snapshot's seq
            row_text = row_json(past)
        out.append((row_text, 1))
    return out, (rows[-1][0] if len(rows) == limit else None)


def first_page(store: Store, channel: Channel, limit: int) -> tuple[int, int, list[tuple[bytes, int]], str | None]:
    """Start a snapshot of `channel`: (its seq N: the head, its total, the first page, the key to
    read on from), all from one read transaction."""
    if not isinstance(store, Store):
        return _postgres().first_page(store, channel, limit)
    conn = store.conn
    conn.execute("BEGIN")
    try:
        seq = conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
        total = _count_at(conn, channel, seq)
        rows, more = _read_page(conn, channel, seq, "", limit)
    finally:
        conn.execute("COMMIT")
    return seq, total, rows, more


def read_page(store: Store, channel: Channel, seq: int, after: str, limit: int
              ) -> tuple[list[tuple[bytes, int]], str | None]:
    """The next page of a snapshot begun with `first_page` (see _read_page)."""
    if not isinstance(store, Store):
        return _postgres().read_page(store, channel, seq, after, limit)
    return _read_page(store.conn, channel, seq, after, limit)


def order_at(store: Store, order_id: str, seq: int) -> Order | None:
    """The order right after event `seq` (None if it did not exist then)."""
    if not isinstance(store, Store):
        return _postgres().order_at(store, order_id, seq)
    return _order_at(store.conn, order_id, seq)


def stock_at(store: Store, sku: str, seq: int) -> Stock | None:
    """The stock level right after event `seq` (None if the sku had no event by then)."""
    if not isinstance(store, Store):
        return _postgres().stock_at(store, sku, seq)
    return _stock_at(store.conn, sku, seq)


def _postgres() -> Any:
    """The same reads on PostgreSQL (imported only for a PostgreSQL store: psycopg is optional)."""
    from .postgres import snapshots

    return snapshots
