"""The PostgreSQL event log: the same log as `orderlog.store.log.Store` (one public interface),
on a database that several `orderlog serve` nodes share.

Theory of operation.
- Appends take turns on one row: every append transaction first locks `log_head`
  (`SELECT ... FOR UPDATE`), reads the newest seq and hash there, and updates it before it
  commits. So seqs are handed out in commit order, and a reader reading `seq > last` never
  has to go back for an event that committed late (the classic gap of sequence-based event
  stores, whose numbers are taken before commit). Transactions run at READ COMMITTED: each
  statement after the lock sees every batch committed before it, so the idempotency records
  and projections the batch reads are current.
- Idempotency records, events and projections are written in the append's transaction, and
  `pg_notify` in it announces the new head to every node's listener when it commits.
- The batch itself is decided by `orderlog.store.batch` (the same steps as on SQLite); only
  the reads and writes around it are here.

Blocking I/O through psycopg 3, called from worker threads (see listen.py for why not async).
Each store holds a small psycopg_pool: a connection broken by a PostgreSQL restart is thrown
away when it comes back to the pool and a new one is made, so the store recovers by itself.
One store object is used by one thread at a time, like the SQLite store.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Callable, Iterator, Sequence

import attrs
import psycopg
import psycopg_pool

from ...canonical import ZERO_HASH, dumps_validated
from ...domain import Event, Order, Role, State, Stock, fold
from ...feed import FEED_COLUMNS, Channel, FeedEvent, channel_frames, feed_event
from ...records import Ack, BatchResult, Filter, Request
from ..batch import BatchRows, LastEvent, StoredAcks, decide_batch
from ..log import EVENT_COLUMNS, filter_sql, row_to_event
from ..schema import StoreError, Unavailable
from .. import projections
from ..projections import ORDER_COLUMNS, STOCK_COLUMNS, ProjectionCache, row_to_order, row_to_stock
from ..copying import LOG_TABLES
from . import schema
from .listen import HEAD_CHANNEL, HeadListener

POOL_TIMEOUT = 5.0  # seconds to wait for a connection before a call fails (Unavailable for writes)
SYNCHRONOUS_COMMIT = {"OFF": "off", "NORMAL": "on", "FULL": "on", "EXTRA": "on"}  # --synchronous -> synchronous_commit
READ_PAGE = 5000  # events per query while walking the whole log
# Every read here is "the next N in key order": the plan must walk an index in that order and
# stop after N. Left to its estimates (and a prepared statement's generic plan), the planner
# often collected a whole range instead, the catch-up's `seq > after AND seq <= head AND
# starts_with(stream, 'order:')` through the (stream, seq) index, and sorted it, for every page:
# 20 ms a page at 30,000 events, quadratic over a replay (4,500 events/s at 200,000). With sorts
# priced out, a LIMIT walks the seq (or owner/stream) index and stops (0.4 ms a page).
NO_SORT = "SET enable_sort = off"

_ORDER_UPSERT = (f"INSERT INTO orders ({ORDER_COLUMNS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) "
                 "ON CONFLICT (order_id) DO UPDATE SET customer = excluded.customer, status = excluded.status, "
                 "items = excluded.items, ship_to = excluded.ship_to, note = excluded.note, "
                 "version = excluded.version, created_at = excluded.created_at, "
                 "updated_at = excluded.updated_at, last_seq = excluded.last_seq")
_ORDER_UPDATE = ("UPDATE orders SET status = %s, ship_to = %s, note = %s, version = %s, updated_at = %s, "
                 "last_seq = %s WHERE order_id = %s")
_STOCK_UPSERT = (f"INSERT INTO stock ({STOCK_COLUMNS}) VALUES (%s,%s,%s,%s,%s,%s) "
                 "ON CONFLICT (sku) DO UPDATE SET name = excluded.name, available = excluded.available, "
                 "reserved = excluded.reserved, version = excluded.version, last_seq = excluded.last_seq")


class PgStore:
    """One orderlog on PostgreSQL: a writer, or a read-only reader."""

    def __init__(self, pool: psycopg_pool.ConnectionPool, url: str, readonly: bool, log_id: str):
        self.pool = pool
        self.url = url
        self.path = schema.display_url(url)  # what messages call the database (no password)
        self.readonly = readonly
        self.log_id = log_id
        self._pinned: psycopg.Connection | None = None  # the connection of a read_snapshot()
        self._cache = ProjectionCache()

    # opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, *, create: bool = False, readonly: bool = False, synchronous: str = "FULL",
             migrate_schema: bool = True) -> "PgStore":
        """Open the orderlog in the database at `url` (with `create`, make one in an empty one).

        Raises StoreError with a one-line reason when PostgreSQL cannot be reached, or the
        database holds no orderlog, someone else's tables, or a newer schema.
        """
        mode = SYNCHRONOUS_COMMIT.get(synchronous.upper())
        if mode is None:
            raise StoreError(f"synchronous must be one of {', '.join(SYNCHRONOUS_COMMIT)}, not {synchronous!r}")
        name = schema.display_url(url)
        with schema.connect(url) as conn:
            try:
                if readonly or not (create or migrate_schema):
                    schema.check_orderlog(conn, name, require=True)
                else:
                    schema.check_orderlog(conn, name, require=not create)
                    schema.migrate(conn, name)
                row = conn.execute("SELECT value FROM meta WHERE key = 'log_id'").fetchone()
            except psycopg.Error as exc:
                raise StoreError(f"{name}: {schema.reason(exc)}") from None

        def configure(conn: psycopg.Connection) -> None:
            conn.execute(f"SET synchronous_commit = {mode}")
            conn.execute(NO_SORT)
            if readonly:
                conn.execute("SET default_transaction_read_only = on")

        pool = psycopg_pool.ConnectionPool(
            url, min_size=1, max_size=1, open=True, timeout=POOL_TIMEOUT, configure=configure,
            kwargs={"autocommit": True, "connect_timeout": schema.CONNECT_TIMEOUT}, name="orderlog",
        )
        store = cls(pool, url, readonly, row[0])
        if not readonly:
            store.catch_up_projections()
        return store

    def close(self) -> None:
        self.pool.close()

    def checkpoint(self) -> None:
        """Nothing to fold back (PostgreSQL checkpoints by itself); here for the one interface."""

    @contextlib.contextmanager
    def _conn(self) -> Iterator[psycopg.Connection]:
        """A connection for one call (the snapshot's, inside read_snapshot). A connection lost
        meanwhile (PostgreSQL restarting, a terminated backend) raises Unavailable; the pool
        replaces it, so a later call works again."""
        if self._pinned is not None:
            yield self._pinned
            return
        try:
            with self.pool.connection() as conn:
                yield conn
        except psycopg.OperationalError as exc:
            raise Unavailable(schema.reason(exc)) from None

    def _one(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        with self._conn() as conn:
            return conn.execute(sql, params).fetchone()

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._conn() as conn:
            return conn.execute(sql, params).fetchall()

    # reading ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def read_snapshot(self) -> Iterator[None]:
        """Every read of this store inside the block sees one snapshot of the database."""
        with self.pool.connection() as conn:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                self._pinned = conn
                try:
                    yield
                finally:
                    self._pinned = None

    def schema_version(self) -> int:
        with self._conn() as conn:
            return schema.applied(conn)

    def applied_migrations(self, after: int = 0) -> list[tuple[int, str]]:
        return self._all("SELECT version, name FROM schema_migrations WHERE version > %s ORDER BY version", (after,))

    def head(self) -> int:
        """The seq of the newest committed event (0 for an empty log)."""
        return self._one("SELECT seq FROM log_head")[0]  # type: ignore[index]

    def last_event(self) -> tuple[int, str | None]:
        """(seq, hash) of the newest committed event; (0, None) for an empty log."""
        seq, hash_ = self._one("SELECT seq, hash FROM log_head")  # type: ignore[misc]
        return (seq, hash_) if seq else (0, None)

    def projection_seq(self) -> int:
        row = self._one("SELECT value FROM meta WHERE key = 'projection_seq'")
        return int(row[0]) if row else 0

    def get_order(self, order_id: str) -> Order | None:
        row = self._one(f"SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = %s", (order_id,))
        return row_to_order(row) if row else None

    def get_stock(self, sku: str) -> Stock | None:
        row = self._one(f"SELECT {STOCK_COLUMNS} FROM stock WHERE sku = %s", (sku,))
        return row_to_stock(row) if row else None

    def read_events(self, filt: Filter = Filter(), limit: int | None = 1000) -> list[Event]:
        """Events matching `filt` with seq > filt.after, in seq order, at most `limit`."""
        sql, params = filter_sql(filt, "%s")
        if limit is not None:
            sql += " LIMIT %s"
            params.append(limit)
        return [row_to_event(r) for r in self._all(sql, params)]

    def iter_events(self, filt: Filter = Filter(), page: int = READ_PAGE) -> Iterator[Event]:
        """All matching events, read in pages."""
        for rows in self._pages(filt, page):
            yield from map(row_to_event, rows)

    def iter_event_rows(self, page: int = READ_PAGE) -> Iterator[tuple]:
        """Every stored event row (EVENT_COLUMNS, data as stored text), in seq order."""
        for rows in self._pages(Filter(), page):
            yield from rows

    def _pages(self, filt: Filter, page: int) -> Iterator[list[tuple]]:
        after = filt.after
        while True:
            sql, params = filter_sql(attrs.evolve(filt, after=after), "%s")
            rows = self._all(sql + " LIMIT %s", [*params, page])
            yield rows
            if len(rows) < page:
                return
            after = rows[-1][0]

    def read_feed(self, channel: Channel | None, after: int, until: int, limit: int) -> list[FeedEvent]:
        """Committed events with after < seq <= until that `channel` sees (all if None), in order."""
        where, params = _channel_where(channel) if channel is not None else ("true", [])
        rows = self._all(f"SELECT {FEED_COLUMNS} FROM events WHERE seq > %s AND seq <= %s AND {where} "
                         "ORDER BY seq LIMIT %s", [after, until, *params, limit])
        return [feed_event(row) for row in rows]

    def read_frames(self, channel: Channel, after: int, until: int, limit: int, prev: int) -> tuple[list[bytes], int]:
        """`channel`'s catch-up frames for after < seq <= until (at most `limit` events)."""
        return channel_frames(channel, self.read_feed(channel, after, until, limit), prev)

    def stored_projections(self) -> State:
        """The projections as stored (for comparing with a rebuild)."""
        orders = {o.order_id: o for o in map(row_to_order, self._all(f"SELECT {ORDER_COLUMNS} FROM orders"))}
        stock = {s.sku: s for s in map(row_to_stock, self._all(f"SELECT {STOCK_COLUMNS} FROM stock"))}
        return State(orders, stock)

    def counts(self) -> dict[str, Any]:
        """What `orderlog stats` shows, read in the caller's snapshot."""
        skus, available, reserved = self._one(
            "SELECT count(*), coalesce(sum(available), 0), coalesce(sum(reserved), 0) FROM stock")  # type: ignore[misc]
        size = self._one("SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                         "JOIN pg_namespace n ON n.oid = c.relnamespace "
                         "WHERE n.nspname = current_schema() AND c.relkind = 'r'")[0]  # type: ignore[index]
        return {
            "events_by_type": dict(self._all("SELECT type, count(*) FROM events GROUP BY type ORDER BY type")),
            "orders_by_status": dict(self._all("SELECT status, count(*) FROM orders GROUP BY status ORDER BY status")),
            "stock": {"skus": skus, "available": int(available), "reserved": int(reserved)},
            "file": {"db_bytes": int(size), "wal_bytes": 0, "total_bytes": int(size)},
        }

    def table_rows(self, table: str, columns: str) -> Iterator[tuple]:
        """Every row of one of the log's tables (copying.LOG_TABLES), read by a server-side
        cursor in the caller's read_snapshot."""
        assert self._pinned is not None, "table_rows reads inside read_snapshot()"
        with self._pinned.cursor(name=f"copy_{table}") as cursor:
            cursor.itersize = READ_PAGE
            cursor.execute(f"SELECT {columns} FROM {table} ORDER BY 1, 2")
            yield from cursor

    def load_log(self, log_id: str, projection_seq: int, tables: list[tuple[str, str, Any]]) -> None:
        """Write a whole log copied from elsewhere (copying.copy_log) into this empty one, in one
        transaction; StoreError if it is not empty."""
        with self._conn() as conn, conn.transaction():
            conn.execute("SELECT seq FROM log_head FOR UPDATE")  # no append meanwhile
            for table, _ in LOG_TABLES:
                if conn.execute(f"SELECT EXISTS (SELECT 1 FROM {table})").fetchone()[0]:  # type: ignore[index]
                    raise StoreError(f"{self.path}: not empty (it has {table}); copy only into a new log")
            with conn.cursor() as cursor:
                for table, columns, rows in tables:
                    with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row(row)
            events = tables[0][2]
            if events.last is not None:
                conn.execute("UPDATE log_head SET seq = %s, hash = %s", (events.last[0], events.last[8]))
            conn.execute("UPDATE meta SET value = %s WHERE key = 'log_id'", (log_id,))
            _set_projection_seq(conn, projection_seq)
        self.log_id = log_id
        self._cache.forget()

    def watch_head(self, on_head: Callable[[int], None]) -> HeadListener:
        """Start this node's listener: `on_head(seq)` runs in its thread whenever another node
        announces a new head (and with 0 after each reconnection). Stop it with `.stop()`."""
        return HeadListener(self.url, on_head).start()

    # writing ----------------------------------------------------------------------------

    def execute_batch(self, requests: Sequence[Request]) -> BatchResult:
        """Decide and append a batch of commands in ONE transaction (group commit), in turn with
        every other node's appends; see Store.execute_batch for the outcomes.

        Raises Unavailable when the transaction cannot be committed (PostgreSQL down or
        restarting); then nothing of the batch was written.
        """
        if not requests:
            return BatchResult([])
        with self._conn() as conn, conn.transaction():
            seq, hash_ = conn.execute("SELECT seq, hash FROM log_head FOR UPDATE").fetchone()  # type: ignore[misc]
            # Another node appended since our last batch (or nothing is known yet): the cache is dropped.
            self._cache.check((seq, hash_) if seq else None)
            last = LastEvent(seq, bytes.fromhex(hash_)) if seq else LastEvent(0, ZERO_HASH)
            state = self._cache.load_state(requests, lambda ids: _load_orders(conn, ids),
                                           lambda skus: _load_stock(conn, skus))
            decision = decide_batch(requests, state, last, _stored_acks(conn, requests))
            _write_batch(conn, decision.rows)
        rows = decision.rows
        if rows.events:
            newest = rows.events[-1]
            self._cache.remember(rows.orders, rows.stock, (newest.seq, newest.hash))
        return BatchResult(decision.outcomes, rows.events)

    def probe_writable(self) -> None:
        """Commit a transaction that touches the log's head row, to learn whether PostgreSQL takes
        writes again; raise Unavailable if it does not."""
        with self._conn() as conn, conn.transaction():
            conn.execute("UPDATE log_head SET seq = seq")

    # projections ------------------------------------------------------------------------

    def catch_up_projections(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Fold events after meta.projection_seq into the projections; return how many.

        Normally there are none: appends update the projections in the same transaction.
        """
        done = self.projection_seq()
        if done >= self.head():
            return 0
        return self.rebuild(progress) if done == 0 else self._fold_tail(done)

    def _fold_tail(self, done: int) -> int:
        self._cache.forget()
        with self._conn() as conn, conn.transaction():
            self._pinned = conn  # the pool holds one connection: the reads below share this one
            try:
                conn.execute("SELECT seq FROM log_head FOR UPDATE")  # no append meanwhile
                # Read again under the lock: a node may have appended (and folded its events)
                # since `done` was read; folding those again would count them twice.
                done = self.projection_seq()
                events = list(self.iter_events(Filter(after=done)))
                if not events:
                    return 0
                order_ids = {e.stream[6:] for e in events if e.stream.startswith("order:")}
                skus = {e.stream[4:] for e in events if e.stream.startswith("sku:")}
                state = fold(events, State(_load_orders(conn, order_ids), _load_stock(conn, skus)))
                _write_projections(conn, state.orders.values(), state.stock.values())
                _set_projection_seq(conn, events[-1].seq)
            finally:
                self._pinned = None
        return len(events)

    def fold_log(self, progress: Callable[[int, int], None] | None = None) -> tuple[State, int]:
        """Fold the whole log into a fresh state (nothing written); returns (state, last seq)."""
        return projections.fold_events(self.iter_events(), self.head(), progress)

    def rebuild(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Recompute the projections from the log; return the number of events folded."""
        self._cache.forget()
        state, last = self.fold_log(progress)
        with self._conn() as conn, conn.transaction():
            self._pinned = conn
            try:
                head = conn.execute("SELECT seq FROM log_head FOR UPDATE").fetchone()[0]  # type: ignore[index]
                if head != last:  # appended by a node since the fold: fold those too
                    tail = list(self.iter_events(Filter(after=last)))
                    state = fold(tail, state)
                    last = tail[-1].seq
                conn.execute("DELETE FROM orders")
                conn.execute("DELETE FROM stock")
                _write_projections(conn, state.orders.values(), state.stock.values())
                _set_projection_seq(conn, last)
            finally:
                self._pinned = None
        return last


# -- the SQL of a batch -----------------------------------------------------------------------


def _load_orders(conn: psycopg.Connection, order_ids: set[str]) -> dict[str, Order]:
    if not order_ids:
        return {}
    rows = conn.execute(f"SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = ANY(%s)", (list(order_ids),))
    return {o.order_id: o for o in map(row_to_order, rows)}


def _load_stock(conn: psycopg.Connection, skus: set[str]) -> dict[str, Stock]:
    if not skus:
        return {}
    rows = conn.execute(f"SELECT {STOCK_COLUMNS} FROM stock WHERE sku = ANY(%s)", (list(skus),))
    return {s.sku: s for s in map(row_to_stock, rows)}


def _stored_acks(conn: psycopg.Connection, requests: Sequence[Request]) -> StoredAcks:
    """The stored acks of the batch's (actor, command id) keys, in one query."""
    # Command ids are strings (protocol.py checks them); a key of another type has no stored ack.
    keys = {(r.principal.user, r.command.command_id) for r in requests}
    keys = {k for k in keys if type(k[0]) is str and type(k[1]) is str}
    actors = [k[0] for k in keys]
    ids = [k[1] for k in keys]
    found = {}
    for actor, command_id, seq, version, events in conn.execute(
        "SELECT c.actor, c.command_id, c.seq, c.version, c.events FROM unnest(%s::text[], %s::text[]) AS k(a, i) "
        "JOIN commands AS c ON c.actor = k.a AND c.command_id = k.i", (actors, ids)
    ):
        found[(actor, command_id)] = Ack(seq, version, tuple(json.loads(events)))
    return StoredAcks(found)


def _write_batch(conn: psycopg.Connection, rows: BatchRows) -> None:
    if not rows.events:
        return
    with conn.cursor() as cursor:
        with cursor.copy(f"COPY events ({EVENT_COLUMNS}, order_id, owner) FROM STDIN") as copy:
            for row in rows.events:
                copy.write_row(row)
        with cursor.copy("COPY commands (actor, command_id, seq, version, events) FROM STDIN") as copy:
            for row in rows.commands:
                copy.write_row(row)
    created = rows.created
    updated = [(o.status, o.ship_to, o.note, o.version, o.updated_at, o.last_seq, o.order_id)
               for o in rows.orders.values() if o.order_id not in created]
    if updated:
        with conn.cursor() as cursor:
            cursor.executemany(_ORDER_UPDATE, updated)  # rowcount: the sum over the statements
            if cursor.rowcount != len(updated):  # a row that should exist does not: never drop an update
                _write_projections(conn, (o for o in rows.orders.values() if o.order_id not in created), ())
    _write_projections(conn, (rows.orders[order_id] for order_id in created), rows.stock.values())
    _set_projection_seq(conn, rows.last_seq)
    newest = rows.events[-1]
    conn.execute("UPDATE log_head SET seq = %s, hash = %s", (newest.seq, newest.hash))
    conn.execute("SELECT pg_notify(%s, %s)", (HEAD_CHANNEL, str(newest.seq)))


def _write_projections(conn: psycopg.Connection, orders: Any, stock: Any) -> None:
    order_rows = [(o.order_id, o.customer, o.status, dumps_validated([list(i) for i in o.items]),
                   o.ship_to, o.note, o.version, o.created_at, o.updated_at, o.last_seq) for o in orders]
    stock_rows = [(s.sku, s.name, s.available, s.reserved, s.version, s.last_seq) for s in stock]
    with conn.cursor() as cursor:
        if order_rows:
            cursor.executemany(_ORDER_UPSERT, order_rows)
        if stock_rows:
            cursor.executemany(_STOCK_UPSERT, stock_rows)


def _set_projection_seq(conn: psycopg.Connection, seq: int) -> None:
    conn.execute("UPDATE meta SET value = %s WHERE key = 'projection_seq'", (str(seq),))


# -- reads ------------------------------------------------------------------------------------

def _channel_where(channel: Channel) -> tuple[str, list[Any]]:
    """The WHERE clause (beyond the seq range) selecting this channel's visible events (the
    plans these get: see NO_SORT)."""
    if channel.name == "orders":
        if channel.principal.role == Role.CUSTOMER:
            return "owner = %s AND starts_with(stream, 'order:')", [channel.principal.user]
        return "starts_with(stream, 'order:')", []
    if channel.name == "inventory":
        return "starts_with(stream, 'sku:')", []
    return "stream = %s", [channel.name]
