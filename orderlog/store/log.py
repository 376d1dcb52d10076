"""The SQLite event log (`Store`): group-committed appends, reads, projections, hash chain.
(`postgres.PgStore` is the same interface on PostgreSQL; `backend.open_store` picks one.)

One file in WAL mode. One writer at a time (``BEGIN IMMEDIATE``), any number of readers
(read-only connections see a committed prefix of the log). Every write is one transaction
that appends the events, records the commands for idempotency and updates the projections,
so the projections are always exactly the fold of the log up to ``meta.projection_seq``.

The parts live beside it: `schema` (opening, pragmas, migrations), `batch` (the pure decision
of a batch), `projections` (the projection rows and the writer's cache), `feedreads`.

This module does blocking I/O: the service calls it from a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from typing import Any, Callable, Iterable, Iterator, Sequence

import attrs

from ..canonical import ZERO_HASH
from ..domain import Event, Order, State, Stock, fold
from ..feed import Channel, FeedEvent
from ..records import Ack, BatchResult, Filter, Request
from . import feedreads, projections
from .batch import BatchRows, CommandKey, LastEvent, StoredAcks, decide_batch
from .copying import LOG_TABLES
from .projections import ORDER_COLUMNS, STOCK_COLUMNS, ProjectionCache, row_to_order, row_to_stock
from .schema import SYNCHRONOUS_MODES, StoreError, Unavailable, applied, connect, migrations, schema_version_of, sqlite_reason

__all__ = ["EVENT_COLUMNS", "SYNCHRONOUS_MODES", "Store", "StoreError", "Unavailable", "migrations", "row_to_event",
           "schema_version_of"]

EVENT_COLUMNS = "seq, stream, version, type, at, actor, command_id, data, hash"


def row_to_event(row: Sequence[Any]) -> Event:
    seq, stream, version, type_, at, actor, command_id, data, hash_ = row[:9]
    return Event(seq, stream, version, type_, at, actor, command_id, json.loads(data), hash_)


class Store:
    """One connection to an orderlog database: a writer, or a read-only reader.

    The interface every backend keeps (`postgres.PgStore` too; the service, the CLI and the
    tests use nothing else, apart from `conn` in SQLite-only audits and tests):

    - opening and closing: `Store.open(path, create=, readonly=, synchronous=, migrate_schema=)`,
      `close()`, `checkpoint()`; attributes `path`, `readonly`, `log_id`.
    - schema: `schema_version()`, `applied_migrations(after)`.
    - reading: `head()`, `last_event()`, `projection_seq()`, `get_order(id)`, `get_stock(sku)`,
      `read_events(filter, limit)`, `iter_events(filter, page)`, `read_feed(channel, after,
      until, limit)`, `read_frames(channel, after, until, limit, prev)`; `read_snapshot()`
      (a context: every read in it sees one snapshot), `iter_event_rows()`, `counts()` (for
      verify and stats), `table_rows(table, columns)` (for copy).
    - writing: `execute_batch(requests) -> BatchResult`, `probe_writable()`,
      `load_log(log_id, projection_seq, tables)` (copy into an empty log).
    - other writers: `watch_head(on_head)` starts a wake-up for other nodes' appends (a
      listener with `.stop()`), or returns None when the backend has none (SQLite).
    - projections: `catch_up_projections(progress)`, `fold_log(progress)`, `rebuild(progress)`,
      `stored_projections()`.

    Errors: `StoreError` (cannot be opened or used; one line) and `Unavailable` (a write was not
    committed; nothing of it was written).
    """

    def __init__(self, conn: sqlite3.Connection, path: str, readonly: bool):
        self.conn = conn
        self.path = path
        self.readonly = readonly
        self.log_id = self._meta("log_id")
        self._cache = ProjectionCache()

    # opening ----------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str,
        *,
        create: bool = False,
        readonly: bool = False,
        synchronous: str = "FULL",
        migrate_schema: bool = True,
    ) -> "Store":
        """Open (and with `create`, create) an orderlog database.

        Raises StoreError with a one-line reason when the file is missing, not SQLite, not
        an orderlog, or of a newer schema. Writers apply missing migrations on open.
        """
        conn = connect(path, create=create, readonly=readonly, synchronous=synchronous, migrate_schema=migrate_schema)
        store = cls(conn, path, readonly)
        if not readonly:
            store.catch_up_projections()
        return store

    def close(self) -> None:
        self.conn.close()

    def checkpoint(self) -> None:
        """Fold the WAL back into the database file (at shutdown)."""
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    # reading ----------------------------------------------------------------------------

    def schema_version(self) -> int:
        """The number of the newest migration applied."""
        return applied(self.conn)

    def applied_migrations(self, after: int = 0) -> list[tuple[int, str]]:
        """(number, file name) of the migrations applied, newer than `after`, in order."""
        return self.conn.execute(
            "SELECT version, name FROM schema_migrations WHERE version > ? ORDER BY version", (after,)
        ).fetchall()

    def head(self) -> int:
        """The seq of the newest committed event (0 for an empty log)."""
        row = self.conn.execute("SELECT max(seq) FROM events").fetchone()
        return row[0] or 0

    def last_event(self) -> tuple[int, str | None]:
        """(seq, hash) of the newest committed event; (0, None) for an empty log."""
        row = self.conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        return (row[0], row[1]) if row else (0, None)

    def projection_seq(self) -> int:
        """The seq up to which the projections are the fold of the log."""
        return int(self._meta("projection_seq") or 0)

    def get_order(self, order_id: str) -> Order | None:
        row = self.conn.execute(f"SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = ?", (order_id,)).fetchone()
        return row_to_order(row) if row else None

    def get_stock(self, sku: str) -> Stock | None:
        row = self.conn.execute(f"SELECT {STOCK_COLUMNS} FROM stock WHERE sku = ?", (sku,)).fetchone()
        return row_to_stock(row) if row else None

    def read_events(self, filt: Filter = Filter(), limit: int | None = 1000) -> list[Event]:
        """Events matching `filt` with seq > filt.after, in seq order, at most `limit`."""
        sql, params = filter_sql(filt)
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [row_to_event(r) for r in self.conn.execute(sql, params)]

    def iter_events(self, filt: Filter = Filter(), page: int = 5000) -> Iterator[Event]:
        """All matching events, read in pages so that no read holds a snapshot for long."""
        after = filt.after
        while True:
            batch = self.read_events(attrs.evolve(filt, after=after), limit=page)
            yield from batch
            if len(batch) < page:
                return
            after = batch[-1].seq

    @contextlib.contextmanager
    def read_snapshot(self) -> Iterator[None]:
        """Every read of this store inside the block sees one snapshot of the log (WAL readers
        never block the writer)."""
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            self.conn.execute("ROLLBACK")

    def iter_event_rows(self) -> Iterator[tuple]:
        """Every stored event row (EVENT_COLUMNS, data as stored text), in seq order."""
        return iter(self.conn.execute(f"SELECT {EVENT_COLUMNS} FROM events ORDER BY seq"))

    def counts(self) -> dict[str, Any]:
        """What `orderlog stats` shows, read in the caller's snapshot."""
        conn = self.conn
        skus, available, reserved = conn.execute(
            "SELECT count(*), coalesce(sum(available), 0), coalesce(sum(reserved), 0) FROM stock").fetchone()
        db_bytes, wal_bytes = _size(self.path), _size(self.path + "-wal")
        return {
            "events_by_type": dict(conn.execute("SELECT type, count(*) FROM events GROUP BY type ORDER BY type")),
            "orders_by_status": dict(conn.execute("SELECT status, count(*) FROM orders GROUP BY status ORDER BY status")),
            "stock": {"skus": skus, "available": available, "reserved": reserved},
            "file": {"db_bytes": db_bytes, "wal_bytes": wal_bytes, "total_bytes": db_bytes + wal_bytes},
        }

    def table_rows(self, table: str, columns: str) -> Iterator[tuple]:
        """Every row of one of the log's tables (copying.LOG_TABLES), in the caller's read_snapshot."""
        return iter(self.conn.execute(f"SELECT {columns} FROM {table} ORDER BY 1, 2"))

    def load_log(self, log_id: str, projection_seq: int, tables: list[tuple[str, str, Iterable[tuple]]]) -> None:
        """Write a whole log copied from elsewhere (copying.copy_log) into this empty one, in one
        transaction; StoreError if it is not empty."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            for table, _ in LOG_TABLES:
                if self.conn.execute(f"SELECT EXISTS (SELECT 1 FROM {table})").fetchone()[0]:
                    raise StoreError(f"{self.path}: not empty (it has {table}); copy only into a new log")
            for table, columns, rows in tables:
                marks = ",".join("?" * len(columns.split(",")))
                self.conn.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", rows)
            self.conn.execute("UPDATE meta SET value = ? WHERE key = 'log_id'", (log_id,))
            projections.set_projection_seq(self.conn, projection_seq)
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self.log_id = log_id
        self._cache.forget()

    def watch_head(self, on_head: Callable[[int], None]) -> None:
        """No wake-up from other writers on a SQLite file (the service's poll finds their
        appends); PostgreSQL's store has one (PgStore.watch_head)."""
        return None

    def read_feed(self, channel: Channel | None, after: int, until: int, limit: int) -> list[FeedEvent]:
        """Committed events with after < seq <= until that `channel` sees (all if None), in order."""
        return feedreads.read_feed(self.conn, channel, after, until, limit)

    def read_frames(self, channel: Channel, after: int, until: int, limit: int, prev: int) -> tuple[list[bytes], int]:
        """`channel`'s catch-up frames for after < seq <= until (feedreads.read_frames)."""
        return feedreads.read_frames(self.conn, channel, after, until, limit, prev)

    # writing ----------------------------------------------------------------------------

    def execute_batch(self, requests: Sequence[Request]) -> BatchResult:
        """Decide and append a batch of commands in ONE transaction (group commit).

        Each command is decided in order against the state including the effects of the
        earlier commands of the batch; a rejected one changes nothing and does not disturb
        its neighbours. Returns one Ack or Rejected per request and the events appended (so
        that the service can publish them without reading them back). Raises Unavailable
        when the transaction cannot be committed; then nothing of the batch was written.
        """
        if not requests:
            return BatchResult([])
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise Unavailable(sqlite_reason(exc)) from None
        try:
            decision = decide_batch(requests, *self._batch_inputs(requests))
            self._write_batch(decision.rows)
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise Unavailable(sqlite_reason(exc)) from None
        except BaseException:
            self._rollback()
            raise
        rows = decision.rows
        if rows.events:
            last = rows.events[-1]
            self._cache.remember(rows.orders, rows.stock, (last.seq, last.hash))
        return BatchResult(decision.outcomes, rows.events)

    def _batch_inputs(self, requests: Sequence[Request]) -> tuple[State, LastEvent, StoredAcks]:
        """What `decide_batch` needs, read inside the batch's transaction: the state the commands
        may touch, the log's newest event, and the stored acks of their keys."""
        row = self.conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        # Another writer appended (or nothing is known yet): the cache is dropped, all read.
        self._cache.check((row[0], row[1]) if row else None)
        last = LastEvent(row[0], bytes.fromhex(row[1])) if row else LastEvent(0, ZERO_HASH)
        conn = self.conn
        state = self._cache.load_state(requests, lambda ids: projections.load_orders(conn, ids),
                                       lambda skus: projections.load_stock(conn, skus))
        return state, last, self._stored_acks(requests)

    def _stored_acks(self, requests: Sequence[Request]) -> StoredAcks:
        """The stored acks of the batch's (actor, command id) keys, in a few queries."""
        keys: dict[CommandKey, None] = {}
        unusual: set = set()
        for request in requests:
            key = (request.principal.user, request.command.command_id)
            if type(key[0]) is str and type(key[1]) is str:
                keys[key] = None
            else:
                unusual.add(key)
        found: dict[CommandKey, Ack] = {}
        ordered = list(keys)
        step = projections.SQL_IN_CHUNK // 2  # two variables per key
        for i in range(0, len(ordered), step):
            chunk = ordered[i : i + step]
            values = ",".join(["(?,?)"] * len(chunk))
            params = [part for key in chunk for part in key]
            for actor, command_id, seq, version, events in self.conn.execute(
                f"SELECT c.actor, c.command_id, c.seq, c.version, c.events FROM (VALUES {values}) AS k "
                "CROSS JOIN commands AS c ON c.actor = k.column1 AND c.command_id = k.column2",
                params,
            ):
                found[(actor, command_id)] = Ack(seq, version, tuple(json.loads(events)))
        return StoredAcks(found, frozenset(unusual), self._stored_ack)

    def _stored_ack(self, key: CommandKey) -> Ack | None:
        row = self.conn.execute(
            "SELECT seq, version, events FROM commands WHERE actor = ? AND command_id = ?", key
        ).fetchone()
        return Ack(row[0], row[1], tuple(json.loads(row[2]))) if row else None

    def _write_batch(self, rows: BatchRows) -> None:
        conn = self.conn
        if not rows.events:
            return
        conn.executemany(f"INSERT INTO events ({EVENT_COLUMNS}, order_id, owner) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                         rows.events)
        conn.executemany("INSERT INTO commands (actor, command_id, seq, version, events) VALUES (?,?,?,?,?)",
                         rows.commands)
        projections.write_changes(conn, rows.orders, rows.created, rows.stock.values())
        projections.set_projection_seq(conn, rows.last_seq)

    def probe_writable(self) -> None:
        """Commit a transaction that leaves no trace (a row inserted and deleted again) to learn
        whether the file takes writes again; raise Unavailable if it does not.

        A no-op UPDATE would not do: SQLite skips writing a row that did not change, so the
        commit would touch no page and succeed on a full disk.
        """
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("INSERT INTO meta (key, value) VALUES ('write_probe', '')")
            self.conn.execute("DELETE FROM meta WHERE key = 'write_probe'")
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise Unavailable(sqlite_reason(exc)) from None

    def _rollback(self) -> None:
        try:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    # projections ------------------------------------------------------------------------

    def catch_up_projections(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Fold events after meta.projection_seq into the projections; return how many.

        Normally there are none: appends update the projections in the same transaction.
        """
        done = self.projection_seq()
        head = self.head()
        if done >= head:
            return 0
        return self.rebuild(progress) if done == 0 else self._fold_tail(done)

    def _fold_tail(self, done: int) -> int:
        self._cache.forget()
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            # Read again under the write lock: another writer on this file may have appended (and
            # folded its events) since `done` was read; folding those again would count them twice.
            done = self.projection_seq()
            events = list(self.iter_events(Filter(after=done)))
            if not events:
                self.conn.execute("COMMIT")
                return 0
            order_ids = {e.stream[6:] for e in events if e.stream.startswith("order:")}
            skus = {e.stream[4:] for e in events if e.stream.startswith("sku:")}
            state = State(projections.load_orders(self.conn, order_ids), projections.load_stock(self.conn, skus))
            state = fold(events, state)
            projections.write_projections(self.conn, state.orders.values(), state.stock.values())
            projections.set_projection_seq(self.conn, events[-1].seq)
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return len(events)

    def fold_log(self, progress: Callable[[int, int], None] | None = None) -> tuple[State, int]:
        """Fold the whole log into a fresh state (nothing written); returns (state, last seq)."""
        return projections.fold_events(self.iter_events(), self.head(), progress)

    def rebuild(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Recompute the projections from the log; return the number of events folded."""
        self._cache.forget()
        state, last = self.fold_log(progress)
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            # Events appended by another writer since the fold would be missed: fold them too.
            if self.head() != last:
                tail = list(self.iter_events(Filter(after=last)))
                state = fold(tail, state)
                last = tail[-1].seq
            self.conn.execute("DELETE FROM orders")
            self.conn.execute("DELETE FROM stock")
            projections.write_projections(self.conn, state.orders.values(), state.stock.values())
            projections.set_projection_seq(self.conn, last)
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return last

    def stored_projections(self) -> State:
        """The projections as stored (for comparing with a rebuild)."""
        return projections.stored_projections(self.conn)


# Filter fields that compare one column with one value.
_FILTER_CLAUSES = (
    ("stream", "stream = ?"),
    ("order_id", "order_id = ?"),
    ("actor", "actor = ?"),
    ("until", "seq <= ?"),
    ("from_time", "at >= ?"),
    ("to_time", "at < ?"),
)


def filter_sql(filt: Filter, mark: str = "?") -> tuple[str, list[Any]]:
    """The SELECT of the events matching `filt`, in seq order, with `mark` as the parameter
    placeholder (SQLite's ?, psycopg's %s), and its parameters."""
    where = ["seq > ?"]
    params: list[Any] = [filt.after]
    for field, clause in _FILTER_CLAUSES:
        value = getattr(filt, field)
        if value is not None:
            where.append(clause)
            params.append(value)
    if filt.types is not None:
        where.append(f"type IN ({','.join('?' * len(filt.types))})")
        params.extend(filt.types)
    sql = f"SELECT {EVENT_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY seq"
    return (sql if mark == "?" else sql.replace("?", mark)), params


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
