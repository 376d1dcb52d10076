"""Snapshot pages and `get as_of` on PostgreSQL: the same reads as `orderlog.store.snapshots`
(see there for the model: a row is right as of N when its `last_seq` <= N, else it is folded
again from its stream's events up to N), with the rows encoded in Python (`snapshot.row_json`,
the plain twin of the JSON SQLite builds itself), one piece per row.

Blocking: the service calls these from a worker thread, through the snapshots module.
"""

from __future__ import annotations

from typing import Any

from ...domain import Order, Role, Stock
from ...feed import Channel
from ...records import Filter
from ...snapshot import order_as_of, row_json, stock_as_of
from ..projections import ORDER_COLUMNS, STOCK_COLUMNS, row_to_order, row_to_stock
from .log import PgStore


def _source(channel: Channel) -> tuple[str, str, str, list[Any]]:
    """(table, key column, WHERE, its parameters) of a channel's snapshot rows."""
    if channel.name == "inventory":
        return "stock", "sku", "true", []
    where, params = ["true"], []
    if channel.principal.role == Role.CUSTOMER:
        where, params = ["customer = %s"], [channel.principal.user]
    if channel.name.startswith("order:"):
        where.append("order_id = %s")
        params.append(channel.name[6:])
    return "orders", "order_id", " AND ".join(where), params


def order_at(store: PgStore, order_id: str, seq: int) -> Order | None:
    """The order right after event `seq` (None if it did not exist then)."""
    order = store.get_order(order_id)
    if order is None or order.last_seq <= seq:
        return order
    return order_as_of(store.iter_events(Filter(stream=f"order:{order_id}", until=seq)))


def stock_at(store: PgStore, sku: str, seq: int) -> Stock | None:
    """The stock level right after event `seq` (None if the sku had no event by then)."""
    stock = store.get_stock(sku)
    if stock is None or stock.last_seq <= seq:
        return stock
    return stock_as_of(store.iter_events(Filter(stream=f"sku:{sku}", until=seq)))


def _count_at(store: PgStore, channel: Channel, seq: int) -> int:
    """How many rows the channel's snapshot at `seq` holds (inside the caller's read_snapshot)."""
    table, _, where, params = _source(channel)
    now = store._one(f"SELECT count(*) FROM {table} WHERE {where}", params)[0]  # type: ignore[index]
    if table == "stock":  # rows created after `seq`: their stream's first event is later
        later = store._one("SELECT count(*) FROM events WHERE seq > %s AND version = 1 AND starts_with(stream, 'sku:')",
                           (seq,))[0]  # type: ignore[index]
    else:
        clause, extra = "", []
        if channel.principal.role == Role.CUSTOMER:
            clause, extra = " AND owner = %s", [channel.principal.user]
        if channel.name.startswith("order:"):
            clause, extra = clause + " AND stream = %s", [*extra, channel.name]
        later = store._one(f"SELECT count(*) FROM events WHERE seq > %s AND type = 'order-created'{clause}",
                           [seq, *extra])[0]  # type: ignore[index]
    return now - later


def read_page(store: PgStore, channel: Channel, seq: int, after: str, limit: int
              ) -> tuple[list[tuple[bytes, int]], str | None]:
    """Up to `limit` rows of the channel's snapshot at `seq` with a key > `after`, in key order,
    one (JSON, 1) piece each; and the key to read on from (None: no more rows)."""
    table, key, where, params = _source(channel)
    columns, convert = (ORDER_COLUMNS, row_to_order) if table == "orders" else (STOCK_COLUMNS, row_to_stock)
    rows = store._all(f"SELECT {columns} FROM {table} WHERE {key} > %s AND {where} ORDER BY {key} LIMIT %s",
                      [after, *params, limit])
    pieces = []
    for row in rows:
        item = convert(row)
        if item.last_seq > seq:  # changed since the snapshot's seq: fold it again from the log's prefix
            item = order_at(store, row[0], seq) if table == "orders" else stock_at(store, row[0], seq)
            if item is None:
                continue  # created after the snapshot's seq
        pieces.append((row_json(item), 1))
    return pieces, (rows[-1][0] if len(rows) == limit else None)


def first_page(store: PgStore, channel: Channel, limit: int) -> tuple[int, int, list[tuple[bytes, int]], str | None]:
    """Start a snapshot of `channel`: (its seq N: the head, its total, the first page, the key to
    read on from), all from one read snapshot."""
    with store.read_snapshot():
        seq = store.head()
        total = _count_at(store, channel, seq)
        pieces, more = read_page(store, channel, seq, "", limit)
    return seq, total, pieces, more
