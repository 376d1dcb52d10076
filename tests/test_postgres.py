"""The PostgreSQL backend against the real PostgreSQL: migrations, the CLI, seq order under
concurrent appenders from two nodes, and two real `orderlog serve` nodes on one database.

Every test gets a fresh database of its own (postgres_db.pg_url), dropped afterwards. Where
PostgreSQL is not reachable these tests skip with one line, except under CI, where they fail.
"""

from __future__ import annotations

import json
import socket
import threading
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orderlog.records import Filter
from orderlog.store import StoreError, audit, open_store
from postgres_db import fresh_schema, pg_url, require_postgres  # noqa: F401 (pg_url is a fixture)
from strategies import batch_splits, request_sequences
from test_crash import ServerProcess
from test_store import Model, all_events, outcome_key
from wsclient import EVENT_TYPES, session

READ_TIMEOUT = 30.0  # seconds the concurrent-appenders test may take at most


def _check_log(store: Any) -> None:
    """The chain verifies and the projections equal a fresh fold of the log."""
    result = audit.verify_store(store)
    assert result.ok, result.problem


# -- the store ----------------------------------------------------------------------------------


def test_migrations_are_applied_once_and_foreign_databases_are_refused(pg_url):
    """Opening twice applies each migration once and keeps the log_id; a database of a newer
    schema, with other tables, or with none when not asked to create, is refused with one line."""
    with pytest.raises(StoreError, match="no orderlog here"):
        open_store(pg_url, readonly=True)
    first = open_store(pg_url, create=True)
    try:
        log_id, applied = first.log_id, first.applied_migrations()
        assert [n for n, _ in applied] == list(range(1, len(applied) + 1))
    finally:
        first.close()
    again = open_store(pg_url, create=True)
    try:
        assert (again.log_id, again.applied_migrations()) == (log_id, applied)
        assert again.head() == 0
    finally:
        again.close()
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (99, '0099_future.sql', '2030-01-01T00:00:00.000Z')")
    for options in ({"create": True}, {"readonly": True}):
        with pytest.raises(StoreError, match="newer orderlog"):
            open_store(pg_url, **options)
    with fresh_schema(pg_url) as other:
        with psycopg.connect(other, autocommit=True) as conn:
            conn.execute("CREATE TABLE customers (id int)")
        with pytest.raises(StoreError, match="not an orderlog"):
            open_store(other, create=True)


def test_events_cannot_be_updated_or_deleted(pg_url):
    """The events table refuses UPDATE, DELETE and TRUNCATE, as on SQLite."""
    import psycopg

    from strategies import STAFF
    from orderlog.domain import Command
    from orderlog.records import Request

    store = open_store(pg_url, create=True)
    try:
        store.execute_batch([Request(STAFF, Command("add_stock", "c-1", None, None, {"sku": "sku-a", "quantity": 3}),
                                     "2026-11-25T17:03:00.123Z")])
    finally:
        store.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for sql in ("UPDATE events SET type = 'x'", "DELETE FROM events", "TRUNCATE events"):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(sql)


PROPERTY = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])


@PROPERTY
@given(st.data(), request_sequences())
def test_two_nodes_taking_turns_match_the_reference_model(pg_url, data, sequence):
    """Two stores (two nodes) on one database, taking turns with random batches, give exactly the
    reference model's outcomes, events and projections (as on SQLite, tests/test_store.py)."""
    model = Model()
    with fresh_schema(pg_url) as url:
        writers = [open_store(url, create=True, synchronous="OFF"), open_store(url, synchronous="OFF")]
        try:
            for batch in data.draw(batch_splits(sequence)):
                writer = writers[data.draw(st.integers(0, 1))]
                got = [outcome_key(o) for o in writer.execute_batch(batch).outcomes]
                assert got == [outcome_key(model.execute(r)) for r in batch]
            assert all_events(writers[0]) == model.events
            assert writers[1].stored_projections() == model.state
            _check_log(writers[1])
        finally:
            for writer in writers:
                writer.close()


@PROPERTY
@given(st.lists(request_sequences(), min_size=3, max_size=3), st.data())
def test_seq_order_is_commit_order_under_concurrent_appenders(pg_url, sequences, data):
    """Three appenders on separate connections (two of them sharing nothing but the database, like
    two nodes) and a reader polling `seq > last` at the same time: the reader sees 1..N with no
    gap, in order, and never has to go back; the chain and projections verify."""
    with fresh_schema(pg_url) as url:
        writers = [open_store(url, create=True, synchronous="OFF")] + [open_store(url) for _ in range(2)]
        reader = open_store(url, readonly=True)
        batches = [data.draw(batch_splits(sequence)) for sequence in sequences]
        done = threading.Event()
        failures: list[BaseException] = []
        seen: list[int] = []

        def append(store: Any, split: list) -> None:
            try:
                for batch in split:
                    store.execute_batch(batch)
            except BaseException as exc:  # reported by the main thread
                failures.append(exc)

        def read() -> None:
            last = 0
            try:
                while True:
                    finished = done.is_set()  # read once more after the writers are done
                    events = reader.read_feed(None, last, 2**62, 1000)
                    for event in events:
                        assert event.seq == last + 1, f"after seq {last} the reader got seq {event.seq}"
                        seen.append(event.seq)
                        last = event.seq
                    if finished and not events:
                        return
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=append, args=(w, b)) for w, b in zip(writers, batches)]
        reading = threading.Thread(target=read)
        try:
            reading.start()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(READ_TIMEOUT)
            done.set()
            reading.join(READ_TIMEOUT)
            assert not failures, failures
            head = reader.head()
            assert seen == list(range(1, head + 1))
            _check_log(reader)
        finally:
            done.set()
            for store in [*writers, reader]:
                store.close()


# -- the command line -----------------------------------------------------------------------------


def test_cli_migrate_seed_events_verify_rebuild_stats_on_postgres(pg_url, cli):
    """Every log command works on a postgresql:// --db, and `verify` passes after a seed."""
    done = cli("migrate", "--db", pg_url)
    assert done.returncode == 0 and "created" in done.stdout, done.stderr
    again = cli("migrate", "--db", pg_url)
    assert again.returncode == 0 and "up to date" in again.stdout, again.stderr
    seeded = cli("seed", "--db", pg_url, "--commands", "300", "--seed", "3", "--batch", "50")
    assert seeded.returncode == 0, seeded.stderr
    verified = cli("verify", "--db", pg_url)
    assert verified.returncode == 0 and verified.stdout.startswith("ok "), verified.stdout + verified.stderr
    exported = cli("events", "--db", pg_url, "--format", "jsonl")
    assert exported.returncode == 0, exported.stderr
    events = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)) and events
    stats = cli("stats", "--db", pg_url, "--json")
    assert stats.returncode == 0, stats.stderr
    info = json.loads(stats.stdout)
    assert info["head"] == len(events) and info["projection_seq"] == len(events)
    assert sum(info["events_by_type"].values()) == len(events)
    rebuilt = cli("rebuild", "--db", pg_url)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert cli("verify", "--db", pg_url).returncode == 0


def test_cli_names_an_unreachable_postgres_in_one_line(cli):
    """A PostgreSQL that does not answer is one line on stderr, exit 2, no traceback."""
    require_postgres()
    done = cli("verify", "--db", "postgresql://nobody:secret@127.0.0.1:1/none")
    assert done.returncode == 2
    assert done.stderr.startswith("orderlog: error: postgresql://nobody:***@127.0.0.1:1/none: cannot connect")
    assert "secret" not in done.stderr and "Traceback" not in done.stderr


def test_copy_sqlite_to_postgres_and_back_is_the_same_log(pg_url, cli, tmp_path):
    """`orderlog copy` SQLite -> PostgreSQL -> SQLite keeps seq, hashes, log_id, idempotency
    records and projections: verify passes on each, the JSONL exports are byte-identical, the
    tables are equal; and a destination that holds a log is refused."""
    import sqlite3

    first, last = tmp_path / "first.db", tmp_path / "last.db"
    assert cli("seed", "--db", first, "--commands", "300", "--seed", "5", "--batch", "40").returncode == 0
    there = cli("copy", "--from", first, "--to", pg_url)
    assert there.returncode == 0 and there.stdout.startswith("copied "), there.stderr
    back = cli("copy", "--from", pg_url, "--to", last)
    assert back.returncode == 0, back.stderr
    for db in (first, pg_url, last):
        assert cli("verify", "--db", db).returncode == 0
    exports = [cli("events", "--db", db, "--format", "jsonl").stdout for db in (first, pg_url, last)]
    assert exports[0] and exports[0] == exports[1] == exports[2]
    infos = [json.loads(cli("stats", "--db", db, "--json").stdout) for db in (first, pg_url, last)]
    for info in infos:
        del info["path"], info["file"], info["schema_version"]  # each backend numbers its own migrations
    assert infos[0] == infos[1] == infos[2]

    def tables(path) -> dict:
        with sqlite3.connect(path) as conn:
            return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
                    for t in ("events", "commands", "orders", "stock")}

    assert tables(first) == tables(last)
    again = cli("copy", "--from", first, "--to", pg_url)
    assert again.returncode == 2 and "not empty" in again.stderr, again.stderr
    into_file = cli("copy", "--from", pg_url, "--to", last)
    assert into_file.returncode == 2 and "not empty" in into_file.stderr, into_file.stderr


# -- two nodes ------------------------------------------------------------------------------------


def _events_of(frames: list[dict]) -> list[dict]:
    return [f for f in frames if f["type"] in EVENT_TYPES]


async def test_two_serve_nodes_share_one_log(pg_url, tmp_path):
    """Two `orderlog serve` processes on one database: commands through both land in one log;
    a subscriber on one node gets the other node's events live; a client resumes on the other
    node with no gap and no duplicate; idempotency and expected_version hold across nodes; and
    both nodes send the same events with the same hashes."""
    with ServerProcess(pg_url) as node_a, ServerProcess(pg_url) as node_b:
        url_a, url_b = await node_a.started(), await node_b.started()
        async with session(url_a, "s-1", "staff") as staff_a, session(url_b, "s-2", "staff") as staff_b, \
                session(url_a, "a-1", "auditor") as watcher_a:
            assert staff_a.welcome["log_id"] == staff_b.welcome["log_id"]
            await watcher_a.subscribe("inventory", since=0)
            await watcher_a.live("inventory")
            # commands through both nodes, alternating; node A's subscriber sees them all, in order
            for i in range(6):
                staff = (staff_a, staff_b)[i % 2]
                await staff.ok("add_stock", data={"sku": f"sku-{i % 3}", "quantity": 5})
            live = await watcher_a.events("inventory", 6)
            assert [e["seq"] for e in live] == list(range(1, 7))
            assert all(e["prev"] == e["seq"] - 1 for e in live)

            # idempotency across nodes: the same command id through the other node is the first ack
            async with session(url_a, "c-1", "customer") as c1_a, session(url_b, "c-1", "customer") as c1_b:
                place = {"items": [{"sku": "sku-0", "quantity": 1}]}
                first = await c1_a.ok("place_order", "o-1", place, command_id="place-o-1")
                again = await c1_b.command("place_order", "o-1", place, command_id="place-o-1")
                assert again["type"] == "ack" and again["duplicate"] is True
                assert (again["seq"], again["version"]) == (first["seq"], first["version"])
                # expected_version across nodes: node B sees node A's version
                update = {"ship_to": "Elm St 1"}
                stale = await c1_b.command("update_order", "o-1", update, expected_version=first["version"] - 1)
                assert stale["type"] == "error" and stale["code"] == "conflict", stale
                await c1_b.ok("update_order", "o-1", update, expected_version=first["version"])
                stale_a = await c1_a.command("update_order", "o-1", {"note": "x"}, expected_version=first["version"])
                assert stale_a["type"] == "error" and stale_a["code"] == "conflict", stale_a

            # a client that read up to some seq on node A resumes on node B without gap or duplicate
            seen_a = _events_of(await watcher_a.until(lambda f: f.get("type") == "stock-reserved"))
            last = seen_a[-1]["seq"]
        for i in range(4):  # more commands while nobody listens, through both nodes
            async with session((url_a, url_b)[i % 2], "s-1", "staff") as staff:
                head = (await staff.ok("add_stock", data={"sku": "sku-1", "quantity": 1}))["seq"]

        def through_head(frame: dict) -> bool:
            # A node learns of another node's commit a moment later (NOTIFY), so a `live` marker
            # may come before the newest events: read until the last acked seq instead.
            return frame.get("type") in EVENT_TYPES and frame["seq"] >= head

        async with session(url_b, "a-1", "auditor") as watcher_b, session(url_a, "a-2", "auditor") as check_a:
            await watcher_b.subscribe("inventory", since=last)
            resumed = _events_of(await watcher_b.until(through_head))
            await check_a.subscribe("inventory", since=0)
            everything = _events_of(await check_a.until(through_head))
        assert [e["seq"] for e in resumed] == [e["seq"] for e in everything if e["seq"] > last]
        assert resumed[0]["prev"] == last
        # the same events, byte for byte in their fields and hashes, from either node
        by_seq = {e["seq"]: e for e in everything}
        assert all(by_seq[e["seq"]] == e for e in resumed)
        assert node_a.stop() == 0 and node_b.stop() == 0
    store = open_store(pg_url, readonly=True)
    try:
        assert store.head() >= head
        stored = {e.seq: e.hash for e in store.read_events(Filter(), limit=None)}
        assert all(stored[e["seq"]] == e["hash"] for e in everything)
        _check_log(store)
    finally:
        store.close()


async def test_a_client_resumes_at_once_on_a_node_that_has_not_read_its_seq_yet(pg_url):
    """A seq committed through another writer a moment ago is resumed from on a node that has not
    read it yet (its wake-up still on the way): the node catches up and serves it, never
    `resync_required`. (Before, `since` above the node's own head was refused.)"""
    from orderlog.domain import Command, Principal
    from orderlog.records import Request

    with ServerProcess(pg_url) as node:
        url = await node.started()
        writer = open_store(pg_url)  # another node's writer, in this process
        staff = Principal("s-9", "staff")
        try:
            async with session(url, "a-1", "auditor") as watcher:
                for i in range(20):
                    request = Request(staff, Command("add_stock", f"direct-{i}", None, None,
                                                     {"sku": "sku-z", "quantity": 1}), "2026-11-25T17:03:00.123Z")
                    result = await trio.to_thread.run_sync(writer.execute_batch, [request])
                    seq = result.outcomes[0].seq
                    reply = await watcher.subscribe("inventory", since=seq)  # at once, on the other node
                    assert reply["type"] == "subscribed" and reply["since"] == seq, reply
        finally:
            writer.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_three_nodes_one_sigkilled_under_load_lose_nothing_and_feeds_resume_elsewhere(pg_url, cli):
    """Three `orderlog serve` nodes on one database, command drivers and subscribers (the real
    trio client, each given all three URLs, starting on different nodes), commands from all;
    one node is SIGKILLed mid-load and restarted on its port. Every acked command is in the log
    exactly once with its acked seq, every subscriber (those on the killed node resumed on
    another) got every inventory event exactly once and in order, and `verify` passes."""
    from orderlog.client import OrderlogError, connect
    from wsclient import token

    fast = {"backoff_start": 0.05, "backoff_cap": 0.3}
    ports = [_free_port() for _ in range(3)]
    nodes = [ServerProcess(pg_url, "--port", str(port)) for port in ports]
    urls = [await node.started() for node in nodes]
    rotations = [urls[i:] + urls[:i] for i in range(3)]  # client i starts on node i % 3
    acked: dict[tuple[str, str], int] = {}  # (actor, command id) -> acked seq
    received: dict[int, list[int]] = {}
    notes: dict[int, list[str]] = {}
    stop_load = trio.Event()

    async def drive(i: int) -> None:
        user, role = (f"s-{i}", "staff") if i % 2 == 0 else (f"c-{i}", "customer")
        async with connect(rotations[i % 3], token(user, role), **fast) as client:
            n = 0
            while not stop_load.is_set():
                n += 1
                command_id = f"{user}-{n}"
                try:
                    if role == "staff":
                        ack = await client.command("add_stock", data={"sku": f"sku-{n % 3}", "quantity": 50},
                                                   command_id=command_id)
                    else:
                        ack = await client.command("place_order", f"o-{user}-{n}", command_id=command_id,
                                                   data={"items": [{"sku": f"sku-{n % 3}", "quantity": 1}]})
                except OrderlogError:
                    continue  # rejected (out of stock): not acked, not in the log
                acked[(user, command_id)] = ack["seq"]

    async def watch(i: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
        seqs = received[i] = []
        said = notes[i] = []
        async with connect(rotations[i % 3], token(f"a-{i}", "auditor"), on_status=said.append, **fast) as client:
            task_status.started()
            async for event in client.subscribe("inventory", since=0):
                seqs.append(event["seq"])

    with nodes[0], nodes[1], nodes[2]:
        async with trio.open_nursery() as watchers:
            for i in range(6):
                await watchers.start(watch, i)
            async with trio.open_nursery() as drivers:
                for i in range(6):
                    drivers.start_soon(drive, i)
                await trio.sleep(1.5)
                killed_at = len(acked)
                nodes[0].kill()
                await trio.sleep(1.5)
                nodes[0] = ServerProcess(pg_url, "--port", str(ports[0]))
                assert await nodes[0].started() == urls[0]
                await trio.sleep(1.5)
                stop_load.set()
            store = open_store(pg_url, readonly=True)
            try:
                events = store.read_events(Filter(), limit=None)
            finally:
                store.close()
            inventory = [e.seq for e in events if not e.stream.startswith("order:")]
            with trio.move_on_after(30):
                while any(not seqs or seqs[-1] < inventory[-1] for seqs in received.values()):
                    await trio.sleep(0.05)
            watchers.cancel_scope.cancel()
        for node in nodes:
            node.stop()

    assert killed_at > 0 and len(acked) > killed_at, "commands were acked before and after the kill"
    by_command: dict[tuple[str, str], list[int]] = {}
    for event in events:
        by_command.setdefault((event.actor, event.command_id), []).append(event.seq)
    for key, seq in acked.items():
        assert key in by_command and by_command[key][-1] == seq, (key, seq, by_command.get(key))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    for i, seqs in received.items():
        assert seqs == inventory, f"subscriber {i}: got {len(seqs)} of {len(inventory)} events, or some twice"
    moved = [i for i in range(0, 6, 3) if any(f"connected to {urls[1]}" in note for note in notes[i])]
    assert moved == [0, 3], "the subscribers that started on the killed node resumed on the next one"
    verified = cli("verify", "--db", pg_url)
    assert verified.returncode == 0 and verified.stdout.startswith("ok "), verified.stdout + verified.stderr


# -- failures -------------------------------------------------------------------------------------


def _terminate_node_connections(url: str) -> int:
    """pg_terminate_backend on every other connection to the database at `url` (a node's writer,
    readers and listener); returns how many."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchall()
    return len(rows)


async def test_terminated_connections_answer_unavailable_then_recover_with_nothing_acked_lost(pg_url):
    """A node's PostgreSQL connections are terminated (pg_terminate_backend) three times while a
    client sends commands: a command meanwhile gets `unavailable` (never an internal error) and is
    retried with its id; every acked command is in the log exactly once, a subscriber that stays
    connected gets every event once and in order, /healthz is 200 again, and verify passes."""
    from test_faults import health

    with ServerProcess(pg_url) as node:
        url = await node.started()
        acked: dict[str, dict] = {}
        unavailable = 0
        async with session(url, "s-1", "staff") as staff, session(url, "a-1", "auditor") as watcher:
            await watcher.subscribe("inventory", since=0)
            await watcher.live("inventory")

            async def terminate() -> None:
                for _ in range(3):
                    await trio.sleep(0.4)
                    assert await trio.to_thread.run_sync(_terminate_node_connections, pg_url) >= 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(terminate)
                for i in range(40):
                    command_id = f"k-{i}"
                    with trio.fail_after(30):
                        while True:
                            reply = await staff.command("add_stock", data={"sku": "sku-a", "quantity": 1},
                                                        command_id=command_id)
                            if reply["type"] == "ack":
                                acked[command_id] = reply
                                break
                            assert reply["code"] == "unavailable", reply
                            unavailable += 1
                            await trio.sleep(0.1)
                    await trio.sleep(0.03)
            head = max(a["seq"] for a in acked.values())
            got = _events_of(await watcher.until(lambda f: f.get("type") in EVENT_TYPES and f["seq"] >= head,
                                                 timeout=20))
            assert [e["seq"] for e in got] == list(range(1, head + 1))
            assert all(e["prev"] == e["seq"] - 1 for e in got)
            with trio.fail_after(20):
                while (await health(url))[0] != 200:
                    await trio.sleep(0.2)
        assert node.stop() == 0
        assert "Traceback" not in node.stderr, node.stderr[-3000:]
    store = open_store(pg_url, readonly=True)
    try:
        events = store.read_events(Filter(actor="s-1"), limit=None)
        assert sorted(e.command_id for e in events) == sorted(acked)  # each acked command exactly once
        assert {e.command_id: e.seq for e in events} == {k: a["seq"] for k, a in acked.items()}
        _check_log(store)
    finally:
        store.close()


# -- snapshots ------------------------------------------------------------------------------------


async def test_snapshots_and_get_as_of_on_postgres_fold_to_the_log_while_commands_race(pg_url, tmp_path):
    """tests/test_snapshot.py's race on a node on PostgreSQL: random commands commit while
    snapshots of every channel and role are taken (pages of 2 rows, so later pages meet rows
    changed after N); rows then events fold to the log's fold for every row, `get` agrees."""
    import itertools

    from hypothesis import Phase

    from test_snapshot import ACTIONS, SKUS, UNLIMITED, run_race_example
    from wsclient import running_server, stock_up

    counter = itertools.count()
    async with running_server(tmp_path, db=pg_url, snapshot_page=2, **UNLIMITED) as (url, _, _):
        async with session(url, "sam", "staff") as sam:
            await stock_up(sam, SKUS)

        @settings(max_examples=4, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  phases=[Phase.explicit, Phase.generate])
        @given(actions=ACTIONS, snapshot_at=st.lists(st.integers(0, 20), min_size=6, max_size=6))
        def check(actions, snapshot_at) -> None:
            trio.from_thread.run(run_race_example, url, pg_url, f"x{next(counter)}", actions, snapshot_at)

        await trio.to_thread.run_sync(check)


def test_state_at_a_seq_is_the_same_on_both_backends(pg_url, cli, tmp_path):
    """`orderlog state --at N` of a log and of its copy on PostgreSQL print the same rows."""
    first = tmp_path / "first.db"
    assert cli("seed", "--db", first, "--commands", "200", "--seed", "9", "--batch", "30").returncode == 0
    assert cli("copy", "--from", first, "--to", pg_url).returncode == 0
    for at in ("1", "150", "300"):
        a, b = (cli("state", "--db", db, "--at", at) for db in (first, pg_url))
        assert a.returncode == b.returncode == 0, a.stderr + b.stderr
        assert a.stdout == b.stdout and a.stdout


async def test_a_catch_up_read_that_loses_the_database_closes_1013_without_a_traceback(pg_url):
    """Subscribers replay a log from 0 (reads from PostgreSQL, page by page) while the node's
    connections are terminated: a replay whose read meets the lost connection ends with 1013 "try
    again later" and one log line, never 1011 and a traceback; once PostgreSQL answers again a
    replay from 0 gets the whole log."""
    from trio_websocket import ConnectionClosed, open_websocket_url

    from orderlog.store.seeding import run_seed
    from wsclient import token

    store = open_store(pg_url, create=True)
    try:
        run_seed(store, 2500, 1, 500)
        head = store.head()
    finally:
        store.close()
    codes: list[int] = []

    async def replay(url: str) -> int | None:
        """Subscribe to orders from 0 and read to `live`: None, or the close code."""
        try:
            async with open_websocket_url(f"{url}?token={token('a-1', 'auditor')}") as ws:
                await ws.get_message()  # welcome
                await ws.send_message(json.dumps({"type": "subscribe", "id": "s", "channel": "orders", "since": 0}))
                while json.loads(await ws.get_message())["type"] != "live":
                    pass
        except ConnectionClosed as exc:
            return exc.reason.code
        return None

    with ServerProcess(pg_url) as node:
        url = await node.started()
        with trio.fail_after(90):
            for _ in range(20):  # until a termination lands in the middle of a replay's read
                async with trio.open_nursery() as nursery:
                    async def one() -> None:
                        codes.append(await replay(url))
                    for _ in range(4):
                        nursery.start_soon(one)
                    await trio.sleep(0.05)
                    await trio.to_thread.run_sync(_terminate_node_connections, pg_url)
                if 1013 in codes:
                    break
            assert 1013 in codes, codes
            assert set(codes) <= {None, 1013}, codes
            while await replay(url) is not None:  # PostgreSQL answers again: a whole replay
                await trio.sleep(0.2)
        assert node.stop() == 0
        assert "Traceback" not in node.stderr, node.stderr[-3000:]
        assert "event=connection.database_lost" in node.stderr
    assert head > 4000
