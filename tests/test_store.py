"""The event log on both backends: properties of group commit, projections, idempotency and the
hash chain, plus examples of acks and expected_version; and, on SQLite, append-only triggers,
migrations and foreign files (their PostgreSQL twins are in tests/test_postgres.py).

Every test of the store's promises runs twice, `[sqlite]` on a real SQLite file in a fresh
temporary folder and `[postgresql]` in a fresh schema of the real PostgreSQL test database
(tests/postgres_db.py); no mocks.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sqlite3
import tempfile
from typing import Any, Callable, Iterator, Sequence

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orderlog import domain
from orderlog.domain import Command, Event, Principal, Rejected, State
from orderlog.canonical import event_hash
from orderlog.records import Ack, Request
from orderlog.store import Store, StoreError, migrations
from orderlog.store import open_store as open_log
from postgres_db import ADMIN_URL, fresh_schema, require_postgres

from strategies import (
    AUDITOR,
    STAFF,
    batch_splits,
    batched_sequences,
    commands,
    request_sequences,
)

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# On PostgreSQL every example gets a schema of its own with every migration applied: fewer examples.
EXAMPLES = {"sqlite": 60, "postgresql": 25}

C1 = Principal("c-1", "customer")
C2 = Principal("c-2", "customer")
AT = "2026-11-25T17:03:00.123Z"


# -- the two backends -------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_location(backend: str) -> Iterator[str]:
    """Where a new log may be created: a file in a new temporary folder, or a URL whose
    search_path is a new schema of the PostgreSQL test database (dropped afterwards)."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            yield os.path.join(folder, "orders.db")
    else:
        with fresh_schema(ADMIN_URL) as url:
            yield url


@contextlib.contextmanager
def fresh_store(backend: str) -> Iterator[Any]:
    """A new store at a fresh location (hypothesis examples can't share a fixture's)."""
    with fresh_location(backend) as where:
        store = open_log(where, create=True, synchronous="OFF")
        try:
            yield store
        finally:
            store.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "postgresql":
        require_postgres()
    return request.param


@pytest.fixture
def where(backend: str) -> Iterator[str]:
    """This test's own location on its backend."""
    with fresh_location(backend) as location:
        yield location


@pytest.fixture
def store(where: str) -> Iterator[Any]:
    """A new log at this test's location, closed afterwards."""
    opened = open_log(where, create=True)
    try:
        yield opened
    finally:
        opened.close()


def on_both_backends(*strategies: Any, examples: dict[str, int] = EXAMPLES) -> Callable:
    """Turn `body(backend, *drawn)` into a property test run on each backend, with that
    backend's number of examples (the strategies are drawn as one tuple)."""
    def decorate(body: Callable) -> Callable:
        @functools.wraps(body)
        def test(backend: str) -> None:
            @settings(PROPERTY, max_examples=examples[backend], database=None)
            @given(st.tuples(*strategies))
            def run(drawn: tuple) -> None:
                body(backend, *drawn)
            run()
        del test.__wrapped__  # pytest reads the signature of `test`, not of `body`
        return test
    return decorate


def query(store: Any, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
    """Rows of one read in the store's database (`?` placeholders on both backends)."""
    if isinstance(store, Store):
        return [tuple(row) for row in store.conn.execute(sql, params).fetchall()]
    import psycopg

    with psycopg.connect(store.url) as conn:
        return [tuple(row) for row in conn.execute(sql.replace("?", "%s"), params).fetchall()]


def write_behind(store: Any, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> None:
    """Run statements (each with its rows of parameters) in one transaction on a connection of
    its own, behind the store's back: what an operator's hand or a lost write might do."""
    if isinstance(store, Store):
        conn = sqlite3.connect(store.path)
        try:
            with conn:
                for sql, rows in statements:
                    conn.executemany(sql, rows)
        finally:
            conn.close()
        return
    import psycopg

    with psycopg.connect(store.url) as conn, conn.cursor() as cursor:
        for sql, rows in statements:
            cursor.executemany(sql.replace("?", "%s"), rows)


# -- helpers ----------------------------------------------------------------------------------


def req(principal: Principal, name: str, command_id: str, order_id: str | None = None,
        data: dict[str, Any] | None = None, expected_version: int | None = None, at: str = AT) -> Request:
    return Request(principal, Command(name, command_id, order_id, expected_version, data or {}), at)


def add_stock(sku: str, quantity: int, command_id: str | None = None, **extra: Any) -> Request:
    return req(STAFF, "add_stock", command_id or f"add-{sku}-{quantity}", data={"sku": sku, "quantity": quantity, **extra})


def place(principal: Principal, order_id: str, items: list[tuple[str, int]], command_id: str | None = None,
          **extra: Any) -> Request:
    data = {"items": [{"sku": s, "quantity": q} for s, q in items], **extra}
    return req(principal, "place_order", command_id or f"place-{order_id}", order_id, data)


def one(store: Store, request: Request) -> Ack | Rejected:
    [outcome] = store.execute_batch([request]).outcomes
    return outcome


def outcome_key(outcome: Ack | Rejected) -> tuple:
    """A comparable form of an outcome (Rejected is an exception, without equality)."""
    if isinstance(outcome, Ack):
        return ("ack", outcome.seq, outcome.version, outcome.events, outcome.duplicate)
    return ("rejected", outcome.code, outcome.message, outcome.details)


def all_events(store: Store) -> list[Event]:
    return store.read_events(limit=None)


def dump(store: Any) -> list[Any]:
    """Every table's schema and rows: as SQL text on SQLite; on PostgreSQL every table of the
    log's schema (meta, log_head and schema_migrations too) with its rows, in a fixed order."""
    if isinstance(store, Store):
        return list(store.conn.iterdump())
    tables = [name for name, in query(store, "SELECT table_name FROM information_schema.tables "
                                             "WHERE table_schema = current_schema() ORDER BY table_name")]
    assert {"events", "commands", "orders", "stock", "meta", "log_head"} <= set(tables), tables
    return [(table, sorted(query(store, f"SELECT * FROM {table}"), key=repr)) for table in tables]


def log_tables(store: Any) -> dict[str, list[tuple]]:
    """The log, the idempotency record and the projections (not the random log_id)."""
    return {
        "events": query(store, "SELECT * FROM events ORDER BY seq"),
        "commands": query(store, "SELECT * FROM commands ORDER BY actor, command_id"),
        "orders": query(store, "SELECT * FROM orders ORDER BY order_id"),
        "stock": query(store, "SELECT * FROM stock ORDER BY sku"),
        "projection_seq": query(store, "SELECT value FROM meta WHERE key = 'projection_seq'"),
    }


def file_bytes(store: Any) -> tuple[bytes, bytes]:
    """The raw bytes of the SQLite database file and its WAL (PostgreSQL's files are not ours
    to read: there `dump` compares every table)."""
    if not isinstance(store, Store):
        return b"", b""

    def read(path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""
    return read(store.path), read(store.path + "-wal")


def canonical_hash(prev: bytes, event: Event) -> str:
    """docs/protocol.md section 5, computed here independently of the store's event_hash."""
    body = {"seq": event.seq, "stream": event.stream, "version": event.version, "type": event.type,
            "at": event.at, "actor": event.actor, "command_id": event.command_id, "data": event.data}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(prev + text).hexdigest()


def target_stream(command: Command) -> str:
    if command.name == "add_stock":
        return f"sku:{command.data['sku']}"
    return f"order:{command.order_id}"


class Model:
    """A reference log built from domain.decide/evolve alone: what the store must do."""

    def __init__(self) -> None:
        self.state = State()
        self.events: list[Event] = []
        self.versions: dict[str, int] = {}
        self.acks: dict[tuple[str, str], Ack] = {}
        self.prev = bytes(32)

    def execute(self, request: Request) -> Ack | Rejected:
        key = (request.principal.user, request.command.command_id)
        if key in self.acks:
            return attrs.evolve(self.acks[key], duplicate=True)
        try:
            new_events = domain.decide(request.command, request.principal, self.state)
        except Rejected as rejection:
            return rejection
        for new in new_events:
            self.versions[new.stream] = self.versions.get(new.stream, 0) + 1
            event = Event(len(self.events) + 1, new.stream, self.versions[new.stream], new.type, request.at,
                          request.principal.user, request.command.command_id, new.data)
            event = attrs.evolve(event, hash=canonical_hash(self.prev, event))
            self.prev = bytes.fromhex(event.hash)
            self.state = domain.evolve(self.state, event)
            self.events.append(event)
        ack = Ack(len(self.events), self.versions[target_stream(request.command)],
                  tuple(n.type for n in new_events))
        self.acks[key] = ack
        return ack


def check_log_invariants(store: Any) -> None:
    """Projections == rebuild == fold, seq and versions without gaps, and an intact hash chain."""
    events = all_events(store)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert store.head() == len(events)
    assert store.projection_seq() == len(events)
    versions: dict[str, list[int]] = {}
    for e in events:
        versions.setdefault(e.stream, []).append(e.version)
    for stream, seen in versions.items():
        assert seen == list(range(1, len(seen) + 1)), stream
    prev = bytes(32)
    for e in events:
        assert e.hash == event_hash(prev, e) == canonical_hash(prev, e), e.seq
        prev = bytes.fromhex(e.hash)
    stored = store.stored_projections()
    rebuilt, last = store.fold_log()
    assert last == len(events)
    assert stored == rebuilt == domain.fold(events)
    # Each projection's version/last_seq is its stream's newest event.
    for order_id, order in stored.orders.items():
        assert order.version == len(versions[f"order:{order_id}"])
    for sku, stock in stored.stock.items():
        assert stock.version == len(versions[f"sku:{sku}"])
        assert stock.available >= 0 and stock.reserved >= 0
    # The derived columns used by the per-order and per-customer feeds.
    for seq, order_id, owner in query(store, "SELECT seq, order_id, owner FROM events ORDER BY seq"):
        event = events[seq - 1]
        assert order_id == domain.order_of_event(event.stream, event.data)
        assert owner == (stored.orders[order_id].customer if order_id else None)


# -- properties -------------------------------------------------------------------------------


@on_both_backends(batched_sequences())
def test_projections_equal_rebuild_and_log_is_gapless_and_chained(backend, batches):
    """For random traffic in random batches the projections equal a rebuild and the fold of the log, seqs and versions have no gaps and the hash chain recomputes."""
    with fresh_store(backend) as store:
        for batch in batches:
            outcomes = store.execute_batch(batch).outcomes
            assert len(outcomes) == len(batch)
        check_log_invariants(store)
        before = store.stored_projections()
        store.rebuild()
        assert store.stored_projections() == before


@on_both_backends(batched_sequences())
def test_store_matches_reference_model_of_decide_and_evolve(backend, batches):
    """The store's outcomes and events are exactly those of domain.decide/evolve plus seq, version, at, actor and hash bookkeeping."""
    model = Model()
    with fresh_store(backend) as store:
        for batch in batches:
            got = [outcome_key(o) for o in store.execute_batch(batch).outcomes]
            want = [outcome_key(model.execute(r)) for r in batch]
            assert got == want
        assert all_events(store) == model.events
        assert store.stored_projections() == model.state


@PROPERTY
@given(batched_sequences(), st.lists(st.booleans(), min_size=1, max_size=40))
def test_two_writers_taking_turns_match_one_writer(batches, turns):
    """Two writers on one file, taking turns batch by batch, give the reference model's outcomes,
    events and projections: a writer's projection cache never outlives another writer's append."""
    model = Model()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "orders.db")
        writers = [Store.open(path, create=True, synchronous="OFF"), Store.open(path, synchronous="OFF")]
        try:
            for i, batch in enumerate(batches):
                store = writers[turns[i % len(turns)]]
                got = [outcome_key(o) for o in store.execute_batch(batch).outcomes]
                assert got == [outcome_key(model.execute(r)) for r in batch]
            assert all_events(writers[0]) == model.events
            assert writers[1].stored_projections() == model.state
        finally:
            for store in writers:
                store.close()


def test_an_order_update_is_never_dropped(store):
    """Orders already stored are updated in place without their items; if the row is gone
    (a projection deleted by hand under a running writer) the whole row is written again."""
    for request in (add_stock("sku-a", 5), place(C1, "o-1", [("sku-a", 2)]),
                    req(STAFF, "approve_order", "approve-o-1", "o-1")):
        assert isinstance(one(store, request), Ack)
    assert store.get_order("o-1").status == "approved"
    write_behind(store, [("DELETE FROM orders WHERE order_id = ?", [("o-1",)])])
    assert isinstance(one(store, req(STAFF, "ship_order", "ship-o-1", "o-1")), Ack)
    order = store.get_order("o-1")
    assert order is not None, "the update of an order whose row was gone was dropped"
    assert (order.status, order.items, order.version) == ("shipped", (("sku-a", 2),), 3)
    check_log_invariants(store)


def test_a_schema_1_log_is_migrated_in_place(tmp_path):
    """A log written before migration 0002 opens, gets the leaner indexes, and keeps every event."""
    path = str(tmp_path / "old.db")
    store = Store.open(path, create=True)
    for request in (add_stock("sku-a", 5), place(C1, "o-1", [("sku-a", 2)])):
        assert isinstance(one(store, request), Ack)
    before = log_tables(store)
    store.close()
    conn = sqlite3.connect(path)  # back to schema 1: its indexes, one migration recorded
    conn.executescript("""
        DROP INDEX events_owner_seq;
        CREATE UNIQUE INDEX events_stream_version ON events (stream, version);
        CREATE INDEX events_owner_seq ON events (owner, seq) WHERE owner IS NOT NULL;
        DELETE FROM schema_migrations WHERE version > 1;
    """)
    conn.close()
    store = Store.open(path)
    try:
        assert [v for v, in store.conn.execute("SELECT version FROM schema_migrations ORDER BY version")] == \
               list(range(1, len(migrations()) + 1))
        indexes = {name: sql for name, sql in store.conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'events'")}
        assert "events_stream_version" not in indexes
        assert "substr(stream, 1, 6) = 'order:'" in indexes["events_owner_seq"]
        assert log_tables(store) == before
        assert isinstance(one(store, place(C1, "o-2", [("sku-a", 1)])), Ack)
        check_log_invariants(store)
    finally:
        store.close()


@on_both_backends(request_sequences())
def test_rejected_command_changes_nothing(backend, sequence):
    """Any rejected command, executed alone, leaves every table (and on SQLite the database files byte for byte) unchanged."""
    with fresh_store(backend) as store:
        for request in sequence:
            before_dump, before_bytes = dump(store), file_bytes(store)
            outcome = one(store, request)
            if isinstance(outcome, Rejected):
                assert dump(store) == before_dump, outcome
                assert file_bytes(store) == before_bytes, outcome
        check_log_invariants(store)


@on_both_backends(request_sequences())
def test_one_batch_equals_one_by_one(backend, sequence):
    """A batch mixing good and bad commands gives the same outcomes, log, idempotency record and projections as the same commands one per execute_batch call."""
    with fresh_store(backend) as batched, fresh_store(backend) as single:
        together = [outcome_key(o) for o in batched.execute_batch(sequence).outcomes]
        alone = [outcome_key(one(single, r)) for r in sequence]
        assert together == alone
        assert log_tables(batched) == log_tables(single)
        assert all_events(batched) == all_events(single)


@on_both_backends(st.data(), request_sequences())
def test_repeated_command_ids_return_the_original_ack(backend, data, sequence):
    """Repeating an accepted command id of a user, with any content, returns the original ack marked duplicate and appends nothing, also after a reopen."""
    with fresh_location(backend) as path:
        store = open_log(path, create=True, synchronous="OFF")
        first: dict[tuple[str, str], Ack] = {}
        try:
            for batch in data.draw(batch_splits(sequence)):
                for request, outcome in zip(batch, store.execute_batch(batch).outcomes):
                    key = (request.principal.user, request.command.command_id)
                    if isinstance(outcome, Ack):
                        if key in first:
                            assert outcome == attrs.evolve(first[key], duplicate=True)
                        else:
                            assert not outcome.duplicate
                            first[key] = outcome
                    else:
                        assert key not in first  # a used id never gets a rejection
            for reopen in (False, True):
                if reopen:
                    store.close()
                    store = open_log(path, synchronous="OFF")
                before = log_tables(store)
                replays = []
                for (user, command_id), ack in first.items():
                    principal = next(r.principal for r in sequence if r.principal.user == user)
                    command = data.draw(st.sampled_from([
                        next(r.command for r in sequence
                             if (r.principal.user, r.command.command_id) == (user, command_id)),
                        attrs.evolve(data.draw(commands), command_id=command_id),
                    ]))
                    replays.append((Request(principal, command, "2027-12-31T23:59:59.999Z"), ack))
                if replays:
                    outcomes = store.execute_batch([r for r, _ in replays]).outcomes
                    assert outcomes == [attrs.evolve(ack, duplicate=True) for _, ack in replays]
                assert log_tables(store) == before
            check_log_invariants(store)
        finally:
            store.close()


@settings(max_examples=25, deadline=None)
@given(st.data(), request_sequences())
def test_two_writers_on_one_file_keep_the_log_consistent(data, sequence):
    """Two Store writers on one file, taking turns with random batches, produce the same log as a single writer."""
    model = Model()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "orders.db")
        writers = [Store.open(path, create=True, synchronous="OFF"), Store.open(path, synchronous="OFF")]
        try:
            for batch in data.draw(batch_splits(sequence)):
                writer = writers[data.draw(st.integers(0, 1))]
                got = [outcome_key(o) for o in writer.execute_batch(batch).outcomes]
                assert got == [outcome_key(model.execute(r)) for r in batch]
            for writer in writers:
                assert all_events(writer) == model.events
                check_log_invariants(writer)
        finally:
            for writer in writers:
                writer.close()


@on_both_backends(st.data(), request_sequences(), examples={"sqlite": 25, "postgresql": 15})
def test_projections_behind_the_log_are_caught_up_on_open(backend, data, sequence):
    """Projections left at an older meta.projection_seq (or emptied) are brought up to the log on the next open."""
    with fresh_location(backend) as path:
        store = open_log(path, create=True, synchronous="OFF")
        cut = data.draw(st.integers(0, len(sequence)))
        store.execute_batch(sequence[:cut])
        saved = log_tables(store)
        store.execute_batch(sequence[cut:])
        # Put the projections back to what they were at the cut, as if a crash had lost their updates.
        write_behind(store, [
            ("DELETE FROM orders", [()]),
            ("DELETE FROM stock", [()]),
            ("INSERT INTO orders VALUES (?,?,?,?,?,?,?,?,?,?)", saved["orders"]),
            ("INSERT INTO stock VALUES (?,?,?,?,?,?)", saved["stock"]),
            ("UPDATE meta SET value = ? WHERE key = 'projection_seq'", saved["projection_seq"]),
        ])
        store.close()
        store = open_log(path, synchronous="OFF")
        try:
            check_log_invariants(store)
        finally:
            store.close()


def test_a_catch_up_that_read_a_stale_projection_seq_folds_nothing_twice(store):
    """Opening the log reads meta.projection_seq and then the head; another writer (a node, or a
    second process on the file) may append in between, folding its own events. The catch-up
    must fold only what is still missing once it holds the write lock (`_fold_tail` is called
    with the stale value the race would give it)."""
    for request in (add_stock("sku-a", 5), add_stock("sku-a", 7), place(C1, "o-1", [("sku-a", 2)])):
        assert isinstance(one(store, request), Ack)
    assert store.projection_seq() == store.head() == 4
    assert store._fold_tail(1) == 0  # read 1, but seq 2..4 were folded by their own appends
    assert store.get_stock("sku-a").available == 10
    check_log_invariants(store)
    # and when something is missing, only that is folded
    write_behind(store, [("UPDATE meta SET value = ? WHERE key = 'projection_seq'", [("3",)]),
                         ("UPDATE stock SET available = 12, reserved = 0, version = 2, last_seq = 2 "
                          "WHERE sku = ?", [("sku-a",)])])  # sku-a as of seq 3
    assert store._fold_tail(1) == 1
    check_log_invariants(store)


# -- acks and idempotency examples -------------------------------------------------------------


def test_ack_versions_and_seqs_name_the_target_stream_and_last_event(store):
    """An ack's version is the target stream's version (sku stream for add_stock) and its seq the command's last event."""
    assert one(store, add_stock("sku-a", 10, name="Kibble")) == Ack(1, 1, ("stock-added",))
    assert one(store, add_stock("sku-a", 5)) == Ack(2, 2, ("stock-added",))
    assert one(store, add_stock("sku-b", 5)) == Ack(3, 1, ("stock-added",))
    assert one(store, place(C1, "o-1", [("sku-a", 2), ("sku-b", 1)])) == Ack(
        6, 1, ("order-created", "stock-reserved", "stock-reserved"))
    assert one(store, req(C1, "update_order", "u-1", "o-1", {"note": "ring twice"})) == Ack(7, 2, ("order-updated",))
    assert one(store, req(STAFF, "approve_order", "a-1", "o-1")) == Ack(8, 3, ("order-approved",))
    assert one(store, req(STAFF, "ship_order", "s-1", "o-1", {"carrier": "DHL"})) == Ack(
        11, 4, ("order-shipped", "stock-shipped", "stock-shipped"))
    assert one(store, req(STAFF, "deliver_order", "d-1", "o-1")) == Ack(12, 5, ("order-delivered",))
    assert one(store, place(C2, "o-2", [("sku-a", 1)])) == Ack(14, 1, ("order-created", "stock-reserved"))
    assert one(store, req(C2, "cancel_order", "x-1", "o-2", {"reason": "changed my mind"})) == Ack(
        16, 2, ("order-cancelled", "stock-released"))
    assert store.get_stock("sku-a").to_json() == {
        "sku": "sku-a", "name": "Kibble", "available": 13, "reserved": 0, "version": 6, "last_seq": 16}
    assert store.get_stock("sku-b").to_json() == {
        "sku": "sku-b", "name": None, "available": 4, "reserved": 0, "version": 3, "last_seq": 11}
    order = store.get_order("o-1").to_json()
    assert order["status"] == "delivered" and order["version"] == 5 and order["last_seq"] == 12
    check_log_invariants(store)


def test_stored_events_carry_at_actor_and_command_id_of_their_request(store):
    """Each stored event has the request's `at`, the acting user and the command id, and the data decided."""
    one(store, add_stock("sku-a", 3, command_id="k-1"))
    one(store, req(STAFF, "place_order", "k-2", "o-1", {"items": [{"sku": "sku-a", "quantity": 2}], "customer": "c-1"},
                   at="2026-12-01T08:00:00.000Z"))
    events = all_events(store)
    assert [(e.seq, e.stream, e.version, e.type, e.at, e.actor, e.command_id, e.data) for e in events] == [
        (1, "sku:sku-a", 1, "stock-added", AT, "s-1", "k-1", {"sku": "sku-a", "quantity": 3}),
        (2, "order:o-1", 1, "order-created", "2026-12-01T08:00:00.000Z", "s-1", "k-2",
         {"customer": "c-1", "items": [{"sku": "sku-a", "quantity": 2}]}),
        (3, "sku:sku-a", 2, "stock-reserved", "2026-12-01T08:00:00.000Z", "s-1", "k-2",
         {"sku": "sku-a", "quantity": 2, "order_id": "o-1"}),
    ]
    assert store.get_order("o-1").customer == "c-1"


def test_duplicate_command_returns_original_ack_across_reopen(where):
    """A repeated (user, command id) returns the original ack with duplicate=True and appends nothing, even after a close and reopen."""
    path = where
    store = open_log(path, create=True)
    one(store, add_stock("sku-a", 5))
    first = one(store, place(C1, "o-1", [("sku-a", 2)], command_id="same"))
    assert first == Ack(3, 1, ("order-created", "stock-reserved"), duplicate=False)
    again = one(store, place(C1, "o-9", [("sku-a", 1)], command_id="same"))
    assert again == attrs.evolve(first, duplicate=True)
    assert store.head() == 3
    store.close()
    store = open_log(path)
    before = dump(store)
    assert one(store, req(C1, "cancel_order", "same", "o-1")) == attrs.evolve(first, duplicate=True)
    assert dump(store) == before
    assert store.get_order("o-9") is None
    assert store.get_order("o-1").status == "placed"
    store.close()


def test_duplicate_inside_one_batch_returns_the_first_ack(store):
    """The same (user, command id) twice in one batch is applied once; the second outcome is the first ack marked duplicate."""
    outcomes = store.execute_batch([add_stock("sku-a", 5, command_id="k"), add_stock("sku-a", 7, command_id="k")]).outcomes
    assert outcomes == [Ack(1, 1, ("stock-added",)), Ack(1, 1, ("stock-added",), duplicate=True)]
    assert store.get_stock("sku-a").available == 5


def test_command_ids_are_per_user(store):
    """Two users may use the same command id; each command is applied."""
    one(store, add_stock("sku-a", 5))
    assert one(store, place(C1, "o-1", [("sku-a", 1)], command_id="k")).duplicate is False
    assert one(store, place(C2, "o-2", [("sku-a", 1)], command_id="k")) == Ack(
        5, 1, ("order-created", "stock-reserved"))
    assert store.get_order("o-2").customer == "c-2"


def test_rejected_command_id_is_not_remembered(store):
    """A rejected command's id is not remembered: a later valid command with that id is applied."""
    one(store, add_stock("sku-a", 1))
    refused = one(store, place(C1, "o-1", [("sku-a", 2)], command_id="k"))
    assert isinstance(refused, Rejected) and refused.code == "insufficient_stock"
    assert refused.details == {"sku": "sku-a", "available": 1}
    assert query(store, "SELECT count(*) FROM commands WHERE command_id = 'k'") == [(0,)]
    applied = one(store, place(C1, "o-1", [("sku-a", 1)], command_id="k"))
    assert applied == Ack(3, 1, ("order-created", "stock-reserved"), duplicate=False)
    # and within one batch too
    outcomes = store.execute_batch([
        req(C1, "update_order", "k2", "o-1", {}),
        req(C1, "update_order", "k2", "o-1", {"note": "hi"}),
    ]).outcomes
    assert isinstance(outcomes[0], Rejected) and outcomes[0].code == "bad_request"
    assert outcomes[1] == Ack(4, 2, ("order-updated",))


def test_batch_commands_see_earlier_commands_of_the_same_batch(store):
    """Commands in one batch are decided in order, each against the effects of the ones before it."""
    outcomes = store.execute_batch([
        add_stock("sku-a", 3),
        place(C1, "o-1", [("sku-a", 2)]),
        place(C2, "o-2", [("sku-a", 2)]),
        req(STAFF, "cancel_order", "c", "o-1"),
        place(C2, "o-2", [("sku-a", 2)], command_id="retry"),
        place(C1, "o-2", [("sku-a", 1)], command_id="steal"),
    ]).outcomes
    keys = [outcome_key(o) for o in outcomes]
    assert keys[0] == ("ack", 1, 1, ("stock-added",), False)
    assert keys[1] == ("ack", 3, 1, ("order-created", "stock-reserved"), False)
    assert keys[2][:2] == ("rejected", "insufficient_stock") and keys[2][3] == {"sku": "sku-a", "available": 1}
    assert keys[3] == ("ack", 5, 2, ("order-cancelled", "stock-released"), False)
    assert keys[4] == ("ack", 7, 1, ("order-created", "stock-reserved"), False)
    assert keys[5][:2] == ("rejected", "conflict")
    check_log_invariants(store)


# -- expected_version ------------------------------------------------------------------------


def test_expected_version_on_a_new_stream_is_zero(store):
    """A new stream has version 0: expected_version 0 succeeds, anything else is a conflict naming 0."""
    refused = one(store, req(STAFF, "add_stock", "k1", data={"sku": "sku-a", "quantity": 2}, expected_version=1))
    assert (refused.code, refused.details) == ("conflict", {"current_version": 0})
    assert one(store, req(STAFF, "add_stock", "k2", data={"sku": "sku-a", "quantity": 2}, expected_version=0)) == Ack(
        1, 1, ("stock-added",))
    refused = one(store, req(C1, "place_order", "k3", "o-1", {"items": [{"sku": "sku-a", "quantity": 1}]},
                             expected_version=2))
    assert (refused.code, refused.details) == ("conflict", {"current_version": 0})
    assert one(store, req(C1, "place_order", "k4", "o-1", {"items": [{"sku": "sku-a", "quantity": 1}]},
                          expected_version=0)) == Ack(3, 1, ("order-created", "stock-reserved"))


def test_expected_version_mismatch_is_conflict_with_current_version(store):
    """A mismatched expected_version is `conflict` with details {"current_version": N} and writes nothing; a match succeeds."""
    one(store, add_stock("sku-a", 5))
    one(store, place(C1, "o-1", [("sku-a", 1)]))
    one(store, req(C1, "update_order", "u1", "o-1", {"ship_to": "Elm St 1"}))
    before = dump(store)
    for stale in (0, 1, 3, 99):
        refused = one(store, req(STAFF, "approve_order", f"a{stale}", "o-1", expected_version=stale))
        assert isinstance(refused, Rejected)
        assert (refused.code, refused.details) == ("conflict", {"current_version": 2})
    refused = one(store, req(STAFF, "add_stock", "s9", data={"sku": "sku-a", "quantity": 1}, expected_version=1))
    assert (refused.code, refused.details) == ("conflict", {"current_version": 2})
    assert dump(store) == before
    assert one(store, req(STAFF, "approve_order", "a2", "o-1", expected_version=2)) == Ack(5, 3, ("order-approved",))
    assert one(store, req(STAFF, "add_stock", "s2", data={"sku": "sku-a", "quantity": 1}, expected_version=2)) == Ack(
        6, 3, ("stock-added",))


# -- append-only, migrations, foreign files ----------------------------------------------------


def test_events_cannot_be_updated_or_deleted(tmp_path):
    """UPDATE and DELETE on the events table raise sqlite3 errors from the append-only triggers."""
    store = Store.open(str(tmp_path / "orders.db"), create=True)
    one(store, add_stock("sku-a", 5))
    one(store, add_stock("sku-b", 5))
    before = dump(store)
    for sql in ("UPDATE events SET data = '{}' WHERE seq = 1",
                "UPDATE events SET hash = 'x'",
                "DELETE FROM events WHERE seq = 2",
                "DELETE FROM events"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            store.conn.execute(sql)
    assert dump(store) == before
    # A second, independent connection is refused too.
    other = sqlite3.connect(store.path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            other.execute("DELETE FROM events WHERE seq = 1")
    finally:
        other.close()
    check_log_invariants(store)


def test_migrations_are_applied_exactly_once(tmp_path):
    """Creating a store applies each migration once (one schema_migrations row per file); reopening applies none again."""
    path = str(tmp_path / "orders.db")
    store = Store.open(path, create=True)
    known = migrations()
    assert len(known) >= 1
    rows = store.conn.execute("SELECT version, name, applied_at FROM schema_migrations ORDER BY version").fetchall()
    assert [(v, n) for v, n, _ in rows] == [(n, name) for n, name, _ in known]
    log_id = store.log_id
    one(store, add_stock("sku-a", 5))
    store.close()
    for _ in range(2):
        store = Store.open(path)
        assert store.conn.execute("SELECT version, name, applied_at FROM schema_migrations ORDER BY version"
                                  ).fetchall() == rows
        assert store.log_id == log_id
        assert store.head() == 1
        store.close()
    store = Store.open(path, readonly=True)
    assert store.conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (len(known),)
    store.close()


def test_newer_schema_is_refused(tmp_path):
    """Opening a database written by a newer schema raises StoreError, for writers and readers."""
    path = str(tmp_path / "orders.db")
    Store.open(path, create=True).close()
    conn = sqlite3.connect(path)
    newer = len(migrations()) + 1
    conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (newer, f"{newer:04d}_future.sql", AT))
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        Store.open(path)
    with pytest.raises(StoreError, match="newer"):
        Store.open(path, readonly=True)


def test_foreign_sqlite_database_is_refused(tmp_path):
    """A SQLite database of another application raises StoreError and is left untouched."""
    path = str(tmp_path / "other.db")
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE pets (name TEXT)")
    conn.execute("INSERT INTO pets VALUES ('Rex')")
    conn.commit()
    conn.close()
    for kwargs in ({}, {"create": True}, {"readonly": True}):
        with pytest.raises(StoreError):
            Store.open(path, **kwargs)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall() == [("pets",)]
    conn.close()


def test_foreign_sqlite_database_is_left_untouched(tmp_path):
    """Refusing a foreign SQLite database leaves its file byte-for-byte as it was (no switch to WAL mode)."""
    path = str(tmp_path / "other.db")
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE pets (name TEXT)")
    conn.execute("INSERT INTO pets VALUES ('Rex')")
    conn.commit()
    conn.close()
    with open(path, "rb") as f:
        before = f.read()
    with pytest.raises(StoreError):
        Store.open(path)
    with open(path, "rb") as f:
        after = f.read()
    conn = sqlite3.connect(path)
    journal_mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()
    assert journal_mode == "delete"
    assert after == before


FOREIGN_SCHEMA_MIGRATIONS = {
    # Rails keeps its versions as text timestamps.
    "rails": ("CREATE TABLE schema_migrations (version varchar NOT NULL PRIMARY KEY)",
              "INSERT INTO schema_migrations VALUES ('20240101000000')"),
    # golang-migrate keeps an integer version and a dirty flag.
    "golang-migrate": ("CREATE TABLE schema_migrations (version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL)",
                       "INSERT INTO schema_migrations VALUES (1, 0)"),
}


@pytest.mark.parametrize("flavour", sorted(FOREIGN_SCHEMA_MIGRATIONS))
@pytest.mark.parametrize("readonly", (False, True))
def test_foreign_database_with_its_own_schema_migrations_table_is_refused(tmp_path, flavour, readonly):
    """Another tool's database that happens to have a schema_migrations table raises StoreError, not a crash."""
    path = str(tmp_path / "other.db")
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    for sql in FOREIGN_SCHEMA_MIGRATIONS[flavour]:
        conn.execute(sql)
    conn.commit()
    conn.close()
    with pytest.raises(StoreError):
        Store.open(path, readonly=readonly)
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    assert tables == {"users", "schema_migrations"}


def test_non_sqlite_and_missing_files_are_refused(tmp_path):
    """A file that is not SQLite, a missing file without create, and a folder raise StoreError."""
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database, just text\n" * 10)
    with pytest.raises(StoreError, match="not a SQLite"):
        Store.open(str(junk), create=True)
    assert junk.read_bytes() == b"this is not a database, just text\n" * 10
    with pytest.raises(StoreError):
        Store.open(str(tmp_path / "missing.db"))
    assert not (tmp_path / "missing.db").exists()
    with pytest.raises(StoreError):
        Store.open(str(tmp_path))
    with pytest.raises(StoreError):
        Store.open(str(tmp_path / "no-such-folder" / "orders.db"), create=True)


def test_rejections_from_the_store_carry_the_domain_codes(store):
    """The store returns the domain's rejection for each bad command and keeps going with the rest of the batch."""
    outcomes = store.execute_batch([
        req(AUDITOR, "add_stock", "k1", data={"sku": "sku-a", "quantity": 1}),
        req(STAFF, "add_stock", "k2", data={"sku": "sku-a", "quantity": 0}),
        req(C1, "approve_order", "k3", "o-1"),
        req(C1, "cancel_order", "k4", "o-1"),
        add_stock("sku-a", 1),
        place(C1, "o-1", [("sku-a", 1)]),
        req(C1, "ship_order", "k5", "o-1"),
        req(STAFF, "ship_order", "k6", "o-1"),
        req(C2, "cancel_order", "k7", "o-1"),
        place(C2, "o-1", [("sku-a", 1)]),
    ]).outcomes
    codes = [o.code if isinstance(o, Rejected) else "ack" for o in outcomes]
    assert codes == ["forbidden", "bad_request", "forbidden", "not_found", "ack", "ack", "forbidden",
                     "invalid_state", "not_found", "conflict"]
    check_log_invariants(store)
