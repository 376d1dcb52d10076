"""The SQLite event log: migrations, group-committed appends, reads, projections, hash chain.

One file in WAL mode. One writer at a time (``BEGIN IMMEDIATE``), any number of readers
(read-only connections see a committed prefix of the log). Every write is one transaction
that appends the events, records the commands for idempotency and updates the projections,
so the projections are always exactly the fold of the log up to ``meta.projection_seq``.

This module does blocking I/O: the service calls it from a worker thread.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import os
import re
import secrets
import sqlite3
from collections.abc import Mapping  # not typing.Mapping: isinstance checks on it are several times slower
from datetime import datetime, timezone
from hashlib import sha256 as _sha256
from typing import Any, Callable, Iterable, Iterator, Sequence

import attrs

from ..canonical import ZERO_HASH, dumps, dumps_validated, event_hash, format_time, json_string
from ..domain import (
    EVENT_TYPES,
    FINAL_STATUSES,
    Event,
    Order,
    Rejected,
    State,
    Stock,
    decide,
    evolve_order,
    evolve_stock,
    fold,
    order_of_event,
    stream_of,
)
from ..feed import Channel, FeedEvent
from ..records import Ack, Filter, Outcome, Request
from . import feedreads

log = logging.getLogger("orderlog")

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
BUSY_TIMEOUT_MS = 10_000  # how long a connection waits for another writer's lock
SQL_IN_CHUNK = 500  # keys per "IN (...)" lookup, well under SQLite's variable limit
WRITER_CACHE_KIB = 32 * 1024  # page cache of the writer (a bounded share of RSS; the hot index pages stay in memory)
# WAL pages between automatic checkpoints (SQLite's default is 1000): each checkpoint copies
# the hot index pages back into the file, so doing it less often makes appends much cheaper.
WAL_AUTOCHECKPOINT_PAGES = 10_000
# Projection rows a writer keeps between batches (open orders and stock levels, ~0.5 KB each).
PROJECTION_CACHE_ROWS = 20_000

EVENT_COLUMNS = "seq, stream, version, type, at, actor, command_id, data, hash"
_PLAIN_TYPES = frozenset(t for t in EVENT_TYPES if t.replace("-", "").isalnum() and t.isascii())


class StoreError(Exception):
    """The database cannot be used: missing, not SQLite, not an orderlog, too new. One line."""


class Unavailable(Exception):
    """A write could not be committed (disk full, read-only file, lock timeout); nothing was written."""


_TYPES_TEXT: dict[tuple[str, ...], str] = {}  # memo of _event_types_text (few distinct lists of known types)


def _event_types_text(types: Sequence[str]) -> str:
    """`dumps(list(types))` for the commands table; the known types need no escaping."""
    key = tuple(types)
    text = _TYPES_TEXT.get(key)
    if text is not None:
        return text
    if all(t in _PLAIN_TYPES for t in types):
        text = '["' + '","'.join(types) + '"]'
        if len(_TYPES_TEXT) < 1000:
            _TYPES_TEXT[key] = text
        return text
    return dumps(list(types))


def row_to_event(row: Sequence[Any]) -> Event:
    seq, stream, version, type_, at, actor, command_id, data, hash_ = row[:9]
    return Event(seq, stream, version, type_, at, actor, command_id, json.loads(data), hash_)


# -- migrations -------------------------------------------------------------------------------


def migrations() -> list[tuple[int, str, str]]:
    """The numbered SQL files, in order: (number, file name, SQL)."""
    found = []
    for entry in importlib.resources.files("orderlog.migrations").iterdir():
        match = re.match(r"^(\d+)_.*\.sql$", entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    numbers = [n for n, _, _ in found]
    if numbers != list(range(1, len(numbers) + 1)):
        raise RuntimeError(f"migrations are not numbered 1..N without gaps: {numbers}")
    return found


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _applied(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return row[0] or 0


def _check_orderlog(conn: sqlite3.Connection, path: str, require: bool) -> None:
    """Raise StoreError unless the database is an orderlog (or, when not `require`, empty)."""
    tables = _tables(conn)
    if not tables and not require:
        return
    foreign = StoreError(f"{path}: a SQLite database, but not an orderlog")
    if "schema_migrations" not in tables:
        raise foreign
    columns = {r[1] for r in conn.execute("PRAGMA table_info(schema_migrations)")}
    if columns != {"version", "name", "applied_at"}:
        raise foreign
    if conn.execute("SELECT count(*) FROM schema_migrations WHERE typeof(version) != 'integer'").fetchone()[0]:
        raise foreign
    if (_applied(conn) >= 1 or require) and not {"meta", "events"} <= tables:
        raise foreign


def migrate(conn: sqlite3.Connection, path: str) -> list[str]:
    """Apply the migrations this database lacks, each exactly once; return their names."""
    known = migrations()
    tables = _tables(conn)
    if "schema_migrations" not in tables:
        if tables:
            raise StoreError(f"{path}: a SQLite database, but not an orderlog (it has other tables)")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        conn.execute("COMMIT")
    current = _applied(conn)
    if current > len(known):
        raise StoreError(
            f"{path}: written by a newer orderlog (schema {current}, this one knows {len(known)}); upgrade orderlog"
        )
    done = []
    for number, name, sql in known[current:]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if _applied(conn) >= number:  # another process got there first
                conn.execute("ROLLBACK")
                continue
            for statement in _split_sql(sql):
                conn.execute(statement)
            if number == 1:
                conn.execute("INSERT INTO meta (key, value) VALUES ('log_id', ?)", (secrets.token_hex(16),))
                conn.execute("INSERT INTO meta (key, value) VALUES ('projection_seq', '0')")
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (number, name, format_time(datetime.now(timezone.utc))),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        done.append(name)
    return done


def _split_sql(sql: str) -> list[str]:
    """Split a migration into statements (sqlite3.complete_statement knows about triggers)."""
    statements, current = [], ""
    for line in sql.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current.strip())
            current = ""
    if current.strip() and not all(l.strip().startswith("--") or not l.strip() for l in current.splitlines()):
        raise RuntimeError(f"incomplete SQL statement at the end of a migration: {current[:80]!r}")
    return statements


def schema_version_of(path: str) -> int:
    """The schema version of an existing file, 0 when it has none (Store.open reports the rest)."""
    try:
        conn = sqlite3.connect(f"file:{os.path.abspath(path)}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] or 0
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


# -- the store --------------------------------------------------------------------------------


def _is_sqlite_file(path: str) -> bool:
    with open(path, "rb") as f:
        header = f.read(16)
    return header == b"SQLite format 3\x00" or header == b""


class Store:
    """One connection to an orderlog database: a writer, or a read-only reader."""

    def __init__(self, conn: sqlite3.Connection, path: str, readonly: bool):
        self.conn = conn
        self.path = path
        self.readonly = readonly
        self.log_id = self._meta("log_id")
        self.last_appended: list[tuple] = []
        # The projection rows this writer last committed, so that the next batch need not read
        # them back. Valid only while the log's head is still `_cache_head` (seq, hash): any
        # other writer moves the head, and then the cache is dropped (_decide_batch).
        self._cache_head: tuple[int, str] | None = None
        self._order_cache: dict[str, Order] = {}
        self._stock_cache: dict[str, Stock] = {}

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
        synchronous = synchronous.upper()
        if synchronous not in SYNCHRONOUS_MODES:
            raise StoreError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, not {synchronous!r}")
        exists = os.path.exists(path)
        if not exists and (readonly or not create):
            raise StoreError(f"{path}: no such database file (create one with `orderlog migrate --db {path}`)")
        if exists:
            if os.path.isdir(path):
                raise StoreError(f"{path}: is a directory, not a database file")
            try:
                if not _is_sqlite_file(path):
                    raise StoreError(f"{path}: not a SQLite database")
            except PermissionError:
                raise StoreError(f"{path}: permission denied") from None
        elif create:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise StoreError(f"{path}: the folder {parent} does not exist")
        try:
            if readonly:
                uri = "file:" + _quote_path(os.path.abspath(path)) + "?mode=ro"
                conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            else:
                conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            # Refuse someone else's database before changing anything in it (even its journal mode).
            _check_orderlog(conn, path, require=readonly or not migrate_schema)
            if not readonly:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise StoreError(f"{path}: cannot switch to WAL mode (got {mode})")
                conn.execute(f"PRAGMA synchronous = {synchronous}")
                conn.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
                conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
            conn.execute("PRAGMA foreign_keys = ON")
            tables = _tables(conn)
            if readonly or not migrate_schema:
                if "schema_migrations" not in tables or "events" not in tables or "meta" not in tables:
                    raise StoreError(f"{path}: a SQLite database, but not an orderlog")
                current, known = _applied(conn), len(migrations())
                if current > known:
                    raise StoreError(
                        f"{path}: written by a newer orderlog (schema {current}, this one knows {known}); upgrade orderlog"
                    )
            else:
                migrate(conn, path)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path}: {_sqlite_reason(exc)}") from None
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
        return _applied(self.conn)

    def applied_migrations(self, after: int = 0) -> list[tuple[int, str]]:
        """(number, file name) of the migrations applied, newer than `after`, in order."""
        return self.conn.execute(
            "SELECT version, name FROM schema_migrations WHERE version > ? ORDER BY version", (after,)
        ).fetchall()

    def head(self) -> int:
        """The seq of the newest committed event (0 for an empty log)."""
        row = self.conn.execute("SELECT max(seq) FROM events").fetchone()
        return row[0] or 0

    def projection_seq(self) -> int:
        return int(self._meta("projection_seq") or 0)

    def get_order(self, order_id: str) -> Order | None:
        row = self.conn.execute(f"SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = ?", (order_id,)).fetchone()
        return _row_to_order(row) if row else None

    def get_stock(self, sku: str) -> Stock | None:
        row = self.conn.execute(f"SELECT {STOCK_COLUMNS} FROM stock WHERE sku = ?", (sku,)).fetchone()
        return _row_to_stock(row) if row else None

    def read_events(self, filt: Filter = Filter(), limit: int | None = 1000) -> list[Event]:
        """Events matching `filt` with seq > filt.after, in seq order, at most `limit`."""
        sql, params = _filter_sql(filt)
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

    def read_feed(self, channel: Channel | None, after: int, until: int, limit: int) -> list[FeedEvent]:
        """Committed events with after < seq <= until that `channel` sees (all if None), in order."""
        return feedreads.read_feed(self.conn, channel, after, until, limit)

    def read_frames(self, channel: Channel, after: int, until: int, limit: int, prev: int) -> tuple[list[bytes], int]:
        """`channel`'s catch-up frames for after < seq <= until (feedreads.read_frames)."""
        return feedreads.read_frames(self.conn, channel, after, until, limit, prev)

    # writing ----------------------------------------------------------------------------

    def execute_batch(self, requests: Sequence[Request]) -> list[Outcome]:
        """Decide and append a batch of commands in ONE transaction (group commit).

        Each command is decided in order against the state including the effects of the
        earlier commands of the batch; a rejected one changes nothing and does not disturb
        its neighbours. Returns one Ack or Rejected per request. Raises Unavailable when the
        transaction cannot be committed; then nothing of the batch was written.
        """
        if not requests:
            return []
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise Unavailable(_sqlite_reason(exc)) from None
        try:
            outcomes, rows = self._decide_batch(requests)
            self._write_batch(rows)
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise Unavailable(_sqlite_reason(exc)) from None
        except BaseException:
            self._rollback()
            raise
        # The rows just appended, in FEED_COLUMNS order (feed.py), so that the service can
        # publish them without reading them back.
        self.last_appended = rows.events
        if rows.events:
            self._remember(rows)
        return outcomes

    def _remember(self, rows: "_BatchRows") -> None:
        """Keep the projection rows just committed for the next batch (bounded: finished orders
        are not kept, and a cache over its cap starts again empty)."""
        orders, stock = self._order_cache, self._stock_cache
        if len(orders) > PROJECTION_CACHE_ROWS or len(stock) > PROJECTION_CACHE_ROWS:
            orders.clear()
            stock.clear()
        for order_id, order in rows.orders.items():
            if order.status in FINAL_STATUSES:
                orders.pop(order_id, None)
            else:
                orders[order_id] = order
        stock.update(rows.stock)
        last = rows.events[-1]
        self._cache_head = (last[0], last[8])

    def _forget_cache(self) -> None:
        self._cache_head = None
        self._order_cache.clear()
        self._stock_cache.clear()

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
            raise Unavailable(_sqlite_reason(exc)) from None

    def _rollback(self) -> None:
        try:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _decide_batch(self, requests: Sequence[Request]) -> tuple[list[Outcome], "_BatchRows"]:
        conn = self.conn
        row = conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        if row is None or (row[0], row[1]) != self._cache_head:
            self._forget_cache()  # another writer appended (or nothing is known yet): read it all
        seq, prev_hash = (row[0], bytes.fromhex(row[1])) if row else (0, ZERO_HASH)
        orders, stock = self._load_state(requests)
        state = State(orders, stock)
        seen: dict[tuple[str, str], Ack] = {}
        stored, unusual = self._stored_acks(requests)
        rows = _BatchRows()
        outcomes: list[Outcome] = []
        for request in requests:
            key = (request.principal.user, request.command.command_id)
            earlier = seen.get(key) or (self._stored_ack(key) if key in unusual else stored.get(key))
            if earlier is not None:
                outcomes.append(attrs.evolve(earlier, duplicate=True))
                continue
            try:
                new_events = decide(request.command, request.principal, state)
            except Rejected as rejection:
                # Kept without its traceback: that would hold this frame, whose `outcomes`
                # holds the rejection, a cycle that keeps the whole batch alive until the
                # garbage collector finds it.
                rejection.__traceback__ = None
                outcomes.append(rejection)
                continue
            except Exception:
                # A bug, not the client's fault: this command fails alone, its neighbours go on.
                log.exception("event=decide.crashed actor=%r command=%r", key[0], request.command.name)
                outcomes.append(Rejected("internal", "internal error; the command was not applied"))
                continue
            at, actor, command_id = request.at, key[0], key[1]
            # canonical(event) (event_hash) without a second encoding of the data: keys in
            # sorted order, the per-command fields encoded once. Only for plain str fields;
            # anything else takes event_hash's general path.
            plain = type(at) is str and type(actor) is str and type(command_id) is str
            if plain:
                head = ('{"actor":' + json_string(actor) + ',"at":' + json_string(at) + ',"command_id":'
                        + json_string(command_id) + ',"data":')
            touched_orders: dict[str, Order] = {}
            touched_stock: dict[str, Stock] = {}
            types: list[str] = []
            for new in new_events:
                seq += 1
                stream, type_, data = new.stream, new.type, new.data
                is_order = stream.startswith("order:")
                if is_order:
                    key_ = stream[6:]
                    current = touched_orders.get(key_) or orders.get(key_)
                else:
                    key_ = stream[4:]
                    current = touched_stock.get(key_) or stock.get(key_)
                version = (current.version if current else 0) + 1
                data_text = dumps_validated(data)
                if plain and type(stream) is str and type(type_) is str:
                    canonical = (head + data_text + ',"seq":' + str(seq) + ',"stream":' + json_string(stream)
                                 + ',"type":' + json_string(type_) + ',"version":' + str(version) + "}").encode()
                    digest = _sha256(prev_hash + canonical).digest()
                    event = Event(seq, stream, version, type_, at, actor, command_id, data, digest.hex())
                else:
                    event = Event(seq, stream, version, type_, at, actor, command_id, data)
                    event = attrs.evolve(event, hash=event_hash(prev_hash, event))
                    digest = bytes.fromhex(event.hash)
                prev_hash = digest
                if is_order:
                    if current is None:
                        rows.created.add(key_)
                    touched_orders[key_] = evolve_order(current, event)  # type: ignore[arg-type]
                else:
                    touched_stock[key_] = evolve_stock(current, event)  # type: ignore[arg-type]
                order_id = order_of_event(stream, data)
                found = (touched_orders.get(order_id) or orders.get(order_id)) if order_id is not None else None
                owner = found.customer if found is not None else None
                types.append(type_)
                rows.events.append((seq, stream, version, type_, at, actor, command_id, data_text, event.hash,
                                    order_id, owner))
            orders.update(touched_orders)
            stock.update(touched_stock)
            target = stream_of(request.command)
            target_version = (orders[target[6:]] if target.startswith("order:") else stock[target[4:]]).version
            event_types = tuple(types)
            ack = Ack(seq, target_version, event_types)
            seen[key] = ack
            outcomes.append(ack)
            rows.commands.append((actor, command_id, seq, target_version, _event_types_text(event_types)))
            rows.orders.update(touched_orders)
            rows.stock.update(touched_stock)
            rows.last_seq = seq
        return outcomes, rows

    def _stored_acks(self, requests: Sequence[Request]) -> tuple[dict[tuple[str, str], Ack], set]:
        """The stored acks of the batch's (actor, command id) keys, in a few queries.

        Returns (acks found, keys of a type this lookup does not bind, left to `_stored_ack`).
        """
        keys: dict[tuple[str, str], None] = {}
        unusual: set = set()
        for request in requests:
            key = (request.principal.user, request.command.command_id)
            if type(key[0]) is str and type(key[1]) is str:
                keys[key] = None
            else:
                unusual.add(key)
        found: dict[tuple[str, str], Ack] = {}
        ordered = list(keys)
        step = SQL_IN_CHUNK // 2  # two variables per key
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
        return found, unusual

    def _stored_ack(self, key: tuple[str, str]) -> Ack | None:
        row = self.conn.execute(
            "SELECT seq, version, events FROM commands WHERE actor = ? AND command_id = ?", key
        ).fetchone()
        return Ack(row[0], row[1], tuple(json.loads(row[2]))) if row else None

    def _load_state(self, requests: Sequence[Request]) -> tuple[dict[str, Order], dict[str, Stock]]:
        """Load the orders and stock levels the batch's commands may touch."""
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
        orders = _cached(self._order_cache, order_ids)
        orders.update((o.order_id, o) for o in self._load_many(
            ORDER_COLUMNS, "orders", "order_id", order_ids - orders.keys(), _row_to_order))
        for order in orders.values():
            skus.update(sku for sku, _ in order.items)
        stock = _cached(self._stock_cache, skus)
        stock.update((s.sku, s) for s in self._load_many(STOCK_COLUMNS, "stock", "sku", skus - stock.keys(), _row_to_stock))
        return orders, stock

    def _load_many(self, columns: str, table: str, key: str, keys: set[str], convert: Callable) -> list:
        found = []
        ordered = sorted(keys)
        for i in range(0, len(ordered), SQL_IN_CHUNK):
            chunk = ordered[i : i + SQL_IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            found.extend(convert(r) for r in self.conn.execute(
                f"SELECT {columns} FROM {table} WHERE {key} IN ({marks})", chunk))
        return found

    def _write_batch(self, rows: "_BatchRows") -> None:
        conn = self.conn
        if not rows.events:
            return
        conn.executemany(f"INSERT INTO events ({EVENT_COLUMNS}, order_id, owner) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                         rows.events)
        conn.executemany("INSERT INTO commands (actor, command_id, seq, version, events) VALUES (?,?,?,?,?)",
                         rows.commands)
        # An order's items never change after order-created, so an existing order's row is
        # updated without its items (not encoded again); new orders are inserted whole.
        created = rows.created
        updated = [(o.status, o.ship_to, o.note, o.version, o.updated_at, o.last_seq, o.order_id)
                   for o in rows.orders.values() if o.order_id not in created]
        if updated:
            cursor = conn.executemany(_ORDER_UPDATE, updated)
            if cursor.rowcount != len(updated):  # a row that should exist does not: never drop an update
                _write_projections(conn, (o for o in rows.orders.values() if o.order_id not in created), ())
        _write_projections(conn, (rows.orders[order_id] for order_id in created), rows.stock.values())
        conn.execute("UPDATE meta SET value = ? WHERE key = 'projection_seq'", (str(rows.last_seq),))

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
        self._forget_cache()
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            events = list(self.iter_events(Filter(after=done)))
            order_ids = {e.stream[6:] for e in events if e.stream.startswith("order:")}
            skus = {e.stream[4:] for e in events if e.stream.startswith("sku:")}
            state = State(
                {o.order_id: o for o in self._load_many(ORDER_COLUMNS, "orders", "order_id", order_ids, _row_to_order)},
                {s.sku: s for s in self._load_many(STOCK_COLUMNS, "stock", "sku", skus, _row_to_stock)},
            )
            state = fold(events, state)
            _write_projections(self.conn, state.orders.values(), state.stock.values())
            self.conn.execute("UPDATE meta SET value = ? WHERE key = 'projection_seq'", (str(events[-1].seq),))
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return len(events)

    def fold_log(self, progress: Callable[[int, int], None] | None = None) -> tuple[State, int]:
        """Fold the whole log into a fresh state (nothing written); returns (state, last seq)."""
        head = self.head()
        orders: dict[str, Order] = {}
        stock: dict[str, Stock] = {}
        last = 0
        for event in self.iter_events():
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

    def rebuild(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Recompute the projections from the log; return the number of events folded."""
        self._forget_cache()
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
            _write_projections(self.conn, state.orders.values(), state.stock.values())
            self.conn.execute("UPDATE meta SET value = ? WHERE key = 'projection_seq'", (str(last),))
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return last

    def stored_projections(self) -> State:
        """The projections as stored (for comparing with a rebuild)."""
        orders = {o.order_id: o for o in map(_row_to_order, self.conn.execute(f"SELECT {ORDER_COLUMNS} FROM orders"))}
        stock = {s.sku: s for s in map(_row_to_stock, self.conn.execute(f"SELECT {STOCK_COLUMNS} FROM stock"))}
        return State(orders, stock)


def _cached(cache: dict, keys: set[str]) -> dict:
    """The entries of `cache` for `keys` (a new dict)."""
    if not cache:
        return {}
    return {k: cache[k] for k in keys if k in cache}


@attrs.define
class _BatchRows:
    events: list[tuple] = attrs.Factory(list)
    commands: list[tuple] = attrs.Factory(list)
    orders: dict[str, Order] = attrs.Factory(dict)
    created: set[str] = attrs.Factory(set)  # ids of the orders created in the batch
    stock: dict[str, Stock] = attrs.Factory(dict)
    last_seq: int = 0


ORDER_COLUMNS = "order_id, customer, status, items, ship_to, note, version, created_at, updated_at, last_seq"
STOCK_COLUMNS = "sku, name, available, reserved, version, last_seq"


def _row_to_order(row: Sequence[Any]) -> Order:
    order_id, customer, status, items, ship_to, note, version, created_at, updated_at, last_seq = row
    return Order(order_id, customer, status, tuple((s, q) for s, q in json.loads(items)), ship_to, note,
                 version, created_at, updated_at, last_seq)


def _row_to_stock(row: Sequence[Any]) -> Stock:
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


def _write_projections(conn: sqlite3.Connection, orders: Iterable[Order], stock: Iterable[Stock]) -> None:
    conn.executemany(
        _ORDER_UPSERT,
        [(o.order_id, o.customer, o.status, dumps_validated([list(i) for i in o.items]), o.ship_to, o.note, o.version,
          o.created_at, o.updated_at, o.last_seq) for o in orders],
    )
    conn.executemany(
        _STOCK_UPSERT,
        [(s.sku, s.name, s.available, s.reserved, s.version, s.last_seq) for s in stock],
    )


# Filter fields that compare one column with one value.
_FILTER_CLAUSES = (
    ("stream", "stream = ?"),
    ("order_id", "order_id = ?"),
    ("actor", "actor = ?"),
    ("until", "seq <= ?"),
    ("from_time", "at >= ?"),
    ("to_time", "at < ?"),
)


def _filter_sql(filt: Filter) -> tuple[str, list[Any]]:
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
    return f"SELECT {EVENT_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY seq", params


def _quote_path(path: str) -> str:
    from urllib.parse import quote

    return quote(path)


def _sqlite_reason(exc: BaseException) -> str:
    text = str(exc)
    if "file is not a database" in text:
        return "not a SQLite database"
    if "readonly" in text or "read-only" in text:
        return "the database file is read-only"
    if "full" in text:
        return "the disk is full"
    if "locked" in text or "busy" in text:
        return "the database is locked by another writer"
    if "unable to open" in text:
        return "cannot open the database file"
    return text
