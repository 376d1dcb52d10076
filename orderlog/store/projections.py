"""The projection tables (`orders`, `stock`): their rows, their writes, and the writer's cache.

The projections are the fold of the log up to `meta.projection_seq`; every append updates them
in the same transaction. `ProjectionCache` keeps the rows a writer last committed so that the
next batch need not read them back.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping  # not typing.Mapping: isinstance checks on it are several times slower
from typing import Any, Callable, Iterable, Sequence

from ..canonical import dumps_validated
from ..domain import FINAL_STATUSES, Event, Order, State, Stock, evolve_order, evolve_stock
from ..records import Request

SQL_IN_CHUNK = 500  # keys per "IN (...)" lookup, well under SQLite's variable limit
# Projection rows a writer keeps between batches (open orders and stock levels, ~0.5 KB each).
PROJECTION_CACHE_ROWS = 20_000

ORDER_COLUMNS = "order_id, customer, status, items, ship_to, note, version, created_at, updated_at, last_seq"
STOCK_COLUMNS = "sku, name, available, reserved, version, last_seq"


def row_to_order(row: Sequence[Any]) -> Order:
    order_id, customer, status, items, ship_to, note, version, created_at, updated_at, last_seq = row
    return Order(order_id, customer, status, tuple((s, q) for s, q in json.loads(items)), ship_to, note,
                 version, created_at, updated_at, last_seq)


def row_to_stock(row: Sequence[Any]) -> Stock:
    return Stock(*row)


def _upsert(table: str, columns: str) -> str:
    """INSERT of a whole row that overwrites every column of an existing one with the same key.

    The same outcome as INSERT OR REPLACE, without deleting and re-inserting the row and its
    index entries (REPLACE does), which made projection writes a large part of an append.
    """
    names = [c.strip() for c in columns.split(",")]
    marks = ",".join("?" * len(names))
    updates = ", ".join(f"{c} = excluded.{c}" for c in names[1:])
    return f"INSERT INTO {table} ({columns}) VALUES ({marks}) ON CONFLICT ({names[0]}) DO UPDATE SET {updates}"


_ORDER_UPSERT = _upsert("orders", ORDER_COLUMNS)
_ORDER_UPDATE = ("UPDATE orders SET status = ?, ship_to = ?, note = ?, version = ?, updated_at = ?, last_seq = ? "
                 "WHERE order_id = ?")
_STOCK_UPSERT = _upsert("stock", STOCK_COLUMNS)


def write_projections(conn: sqlite3.Connection, orders: Iterable[Order], stock: Iterable[Stock]) -> None:
    """Insert or overwrite whole rows."""
    conn.executemany(
        _ORDER_UPSERT,
        [(o.order_id, o.customer, o.status, dumps_validated([list(i) for i in o.items]), o.ship_to, o.note, o.version,
          o.created_at, o.updated_at, o.last_seq) for o in orders],
    )
    conn.executemany(
        _STOCK_UPSERT,
        [(s.sku, s.name, s.available, s.reserved, s.version, s.last_seq) for s in stock],
    )


def write_changes(conn: sqlite3.Connection, orders: Mapping[str, Order], created: set[str],
                  stock: Iterable[Stock]) -> None:
    """Write a batch's projection changes: `created` are the ids of the orders it created.

    An order's items never change after order-created, so an existing order's row is updated
    without its items (not encoded again); new orders are inserted whole.
    """
    updated = [(o.status, o.ship_to, o.note, o.version, o.updated_at, o.last_seq, o.order_id)
               for o in orders.values() if o.order_id not in created]
    if updated:
        cursor = conn.executemany(_ORDER_UPDATE, updated)
        if cursor.rowcount != len(updated):  # a row that should exist does not: never drop an update
            write_projections(conn, (o for o in orders.values() if o.order_id not in created), ())
    write_projections(conn, (orders[order_id] for order_id in created), stock)


def set_projection_seq(conn: sqlite3.Connection, seq: int) -> None:
    conn.execute("UPDATE meta SET value = ? WHERE key = 'projection_seq'", (str(seq),))


def load_many(conn: sqlite3.Connection, columns: str, table: str, key: str, keys: set[str],
              convert: Callable) -> list:
    """The rows of `table` whose `key` is one of `keys`, converted, in a few queries."""
    found = []
    ordered = sorted(keys)
    for i in range(0, len(ordered), SQL_IN_CHUNK):
        chunk = ordered[i : i + SQL_IN_CHUNK]
        marks = ",".join("?" * len(chunk))
        found.extend(convert(r) for r in conn.execute(
            f"SELECT {columns} FROM {table} WHERE {key} IN ({marks})", chunk))
    return found


def load_orders(conn: sqlite3.Connection, order_ids: set[str]) -> dict[str, Order]:
    return {o.order_id: o for o in load_many(conn, ORDER_COLUMNS, "orders", "order_id", order_ids, row_to_order)}


def load_stock(conn: sqlite3.Connection, skus: set[str]) -> dict[str, Stock]:
    return {s.sku: s for s in load_many(conn, STOCK_COLUMNS, "stock", "sku", skus, row_to_stock)}


def stored_projections(conn: sqlite3.Connection) -> State:
    """The projections as stored."""
    orders = {o.order_id: o for o in map(row_to_order, conn.execute(f"SELECT {ORDER_COLUMNS} FROM orders"))}
    stock = {s.sku: s for s in map(row_to_stock, conn.execute(f"SELECT {STOCK_COLUMNS} FROM stock"))}
    return State(orders, stock)


def fold_events(events: Iterable[Event], head: int,
                progress: Callable[[int, int], None] | None = None) -> tuple[State, int]:
    """Fold a whole log's events (in seq order) into a fresh state; returns (state, last seq).
    `progress(seq, head)` every 10,000 events and at the end. Both backends' `fold_log`."""
    orders: dict[str, Order] = {}
    stock: dict[str, Stock] = {}
    last = 0
    for event in events:
        if event.stream.startswith("order:"):
            key = event.stream[6:]
            orders[key] = evolve_order(orders.get(key), event)  # type: ignore[assignment]
        else:
            key = event.stream[4:]
            stock[key] = evolve_stock(stock.get(key), event)
        last = event.seq
        if progress and last % 10_000 == 0:
            progress(last, head)
    if progress:
        progress(last, head)
    return State(orders, stock), last


def touched_keys(requests: Sequence[Request]) -> tuple[set[str], set[str]]:
    """The order ids and skus the batch's commands name (their orders' items come on top)."""
    order_ids: set[str] = set()
    skus: set[str] = set()
    for request in requests:
        command = request.command
        if isinstance(command.order_id, str):
            order_ids.add(command.order_id)
        data = command.data if isinstance(command.data, Mapping) else {}
        if isinstance(data.get("sku"), str):
            skus.add(data["sku"])
        items = data.get("items")
        if isinstance(items, list):
            skus.update(i["sku"] for i in items if isinstance(i, Mapping) and isinstance(i.get("sku"), str))
    return order_ids, skus


class ProjectionCache:
    """The projection rows this writer last committed, kept for the next batch.

    Valid only while the log's newest event is still `last` (seq, hash): any other writer
    appends, and then the cache is dropped (`check`). Bounded: finished orders are not kept,
    and a cache over PROJECTION_CACHE_ROWS starts again empty.
    """

    def __init__(self) -> None:
        self.last: tuple[int, str] | None = None
        self.orders: dict[str, Order] = {}
        self.stock: dict[str, Stock] = {}

    def check(self, last: tuple[int, str] | None) -> None:
        """Drop everything unless the log's newest (seq, hash) is `last` as remembered."""
        if last is None or last != self.last:
            self.forget()

    def forget(self) -> None:
        self.last = None
        self.orders.clear()
        self.stock.clear()

    def load_state(self, requests: Sequence[Request], load_orders: Callable[[set[str]], dict[str, Order]],
                   load_stock: Callable[[set[str]], dict[str, Stock]]) -> State:
        """The orders and stock levels the batch's commands may touch, from the cache or else
        through the backend's `load_orders(ids)` and `load_stock(skus)`."""
        order_ids, skus = touched_keys(requests)
        orders = _cached(self.orders, order_ids)
        orders.update(load_orders(order_ids - orders.keys()))
        for order in orders.values():
            skus.update(sku for sku, _ in order.items)
        stock = _cached(self.stock, skus)
        stock.update(load_stock(skus - stock.keys()))
        return State(orders, stock)

    def remember(self, orders: Mapping[str, Order], stock: Mapping[str, Stock], last: tuple[int, str]) -> None:
        """Keep the rows just committed, whose newest event is `last` (seq, hash)."""
        if len(self.orders) > PROJECTION_CACHE_ROWS or len(self.stock) > PROJECTION_CACHE_ROWS:
            self.orders.clear()
            self.stock.clear()
        for order_id, order in orders.items():
            if order.status in FINAL_STATUSES:
                self.orders.pop(order_id, None)
            else:
                self.orders[order_id] = order
        self.stock.update(stock)
        self.last = last


def _cached(cache: dict, keys: set[str]) -> dict:
    """The entries of `cache` for `keys` (a new dict)."""
    if not cache:
        return {}
    return {k: cache[k] for k in keys if k in cache}
