"""The auditor's promises: verify, rebuild and stats on real files, and the pure checks behind them."""

from __future__ import annotations

import json
import sqlite3

import attrs
import pytest

from orderlog.store.audit import check_chain, compare_projections
from orderlog.domain import Event, Order, State, Stock
from orderlog.canonical import ZERO_HASH, event_hash
from orderlog.store import migrations


def raw(db, *statements):
    """Run SQL statements on the file directly, as an attacker with sqlite3 would."""
    conn = sqlite3.connect(db)
    try:
        for sql in statements:
            conn.execute(sql)
        conn.commit()
    finally:
        conn.close()


# -- verify on real files ----------------------------------------------------------------------


def test_verify_passes_on_a_seeded_log_with_a_one_line_summary(cli, seeded_db):
    """A log written through the command path verifies: exit 0 and one summary line."""
    done = cli("verify", "--db", seeded_db)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(done.stdout.splitlines()) == 1
    assert done.stdout.startswith("ok ") and "hash chain intact" in done.stdout
    assert done.stderr == ""  # no progress bar when stderr is not a terminal


def test_verify_passes_on_an_empty_log(cli, db_path):
    """A freshly migrated, empty log verifies."""
    cli("migrate", "--db", db_path)
    done = cli("verify", "--db", db_path)
    assert done.returncode == 0 and "0 events" in done.stdout


def test_the_triggers_refuse_update_and_delete_of_events(seeded_db):
    """With the migration's triggers in place, UPDATE and DELETE on events raise."""
    for sql in ("UPDATE events SET data = '{}' WHERE seq = 3", "DELETE FROM events WHERE seq = 3"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            raw(seeded_db, sql)


def test_verify_names_the_seq_whose_data_changed(cli, seeded_db):
    """One changed byte in a stored event's data: exit 1 naming that seq as a hash mismatch."""
    conn = sqlite3.connect(seeded_db)
    data = conn.execute("SELECT data FROM events WHERE seq = 123").fetchone()[0]
    conn.close()
    changed = data.replace('"quantity":', '"quantity":1', 1) if '"quantity":' in data else data.replace("}", ',"x":1}', 1)
    assert changed != data
    raw(seeded_db, "DROP TRIGGER events_append_only_update",
        f"UPDATE events SET data = '{changed}' WHERE seq = 123")
    done = cli("verify", "--db", seeded_db)
    assert done.returncode == 1
    assert "seq 123: hash mismatch" in done.stdout
    assert "Traceback" not in done.stderr


def test_verify_names_a_row_whose_data_is_not_json(cli, seeded_db):
    """Data that no longer parses as JSON is reported at its seq, not as a crash."""
    raw(seeded_db, "DROP TRIGGER events_append_only_update", "UPDATE events SET data = '{\"sku\":' WHERE seq = 9")
    done = cli("verify", "--db", seeded_db)
    assert done.returncode == 1 and "seq 9: data is not valid JSON" in done.stdout


def test_verify_names_a_gap_in_seq(cli, seeded_db):
    """A deleted event shows as a gap at the next seq."""
    raw(seeded_db, "DROP TRIGGER events_append_only_delete", "DELETE FROM events WHERE seq = 40")
    done = cli("verify", "--db", seeded_db)
    assert done.returncode == 1 and "seq 41: gap, expected seq 40" in done.stdout


def test_verify_names_a_projection_changed_with_raw_sql(cli, seeded_db):
    """A stock level edited behind the log's back: exit 1 naming the sku and the field."""
    raw(seeded_db, "UPDATE stock SET available = available + 5 WHERE sku = 'cat-food-1kg'")
    done = cli("verify", "--db", seeded_db)
    assert done.returncode == 1
    assert "sku cat-food-1kg: projection has available=" in done.stdout


def test_verify_names_an_order_changed_with_raw_sql(cli, seeded_db):
    """An order's status edited behind the log's back: exit 1 naming the order."""
    conn = sqlite3.connect(seeded_db)
    order_id = conn.execute("SELECT order_id FROM orders WHERE status = 'placed' ORDER BY order_id").fetchone()[0]
    conn.close()
    raw(seeded_db, f"UPDATE orders SET status = 'delivered' WHERE order_id = '{order_id}'")
    done = cli("verify", "--db", seeded_db)
    assert done.returncode == 1
    assert f"order {order_id}: projection has status='delivered', the log says 'placed'" in done.stdout


def test_rebuild_restores_a_tampered_projection(cli, seeded_db):
    """After a projection was edited, rebuild recomputes it from the log and verify passes again."""
    raw(seeded_db, "UPDATE stock SET reserved = 0",
        "DELETE FROM orders WHERE order_id IN (SELECT order_id FROM orders ORDER BY order_id LIMIT 3)")
    assert cli("verify", "--db", seeded_db).returncode == 1
    done = cli("rebuild", "--db", seeded_db)
    assert done.returncode == 0, done.stderr
    assert "rebuilt the projections" in done.stdout and "events in" in done.stdout
    assert cli("verify", "--db", seeded_db).returncode == 0


# -- stats ------------------------------------------------------------------------------------


def test_stats_summarizes_the_log(cli, seeded_db):
    """stats reports head, log_id, counts by type and status, the stock summary and the file size."""
    as_json = cli("stats", "--db", seeded_db, "--json")
    assert as_json.returncode == 0, as_json.stderr
    info = json.loads(as_json.stdout)
    conn = sqlite3.connect(seeded_db)
    head = conn.execute("SELECT max(seq) FROM events").fetchone()[0]
    log_id = conn.execute("SELECT value FROM meta WHERE key = 'log_id'").fetchone()[0]
    conn.close()
    assert info["head"] == head == sum(info["events_by_type"].values())
    assert info["log_id"] == log_id
    assert info["schema_version"] == len(migrations())
    assert info["orders"] == info["events_by_type"]["order-created"] == sum(info["orders_by_status"].values())
    assert info["stock"]["skus"] > 0
    assert info["file"]["total_bytes"] >= info["file"]["db_bytes"] > 0
    text = cli("stats", "--db", seeded_db)
    assert text.returncode == 0
    for fragment in (log_id, f"{head:,}", "events by type", "orders by status", "skus", "file size"):
        assert fragment in text.stdout


# -- the pure checks ---------------------------------------------------------------------------


def chain(*specs):
    """Events (stream, type, data) with seq, version and hash as the store would give them."""
    events, prev, versions = [], ZERO_HASH, {}
    for seq, (stream, type_, data) in enumerate(specs, start=1):
        versions[stream] = versions.get(stream, 0) + 1
        event = Event(seq, stream, versions[stream], type_, "2026-11-25T17:03:00.123Z", "staff-1", f"c-{seq}", data)
        event = attrs.evolve(event, hash=event_hash(prev, event))
        prev = bytes.fromhex(event.hash)
        events.append(event)
    return events


SOUND = chain(
    ("sku:kibble", "stock-added", {"sku": "kibble", "quantity": 5}),
    ("order:o-1", "order-created", {"customer": "u-1", "items": [{"sku": "kibble", "quantity": 2}]}),
    ("sku:kibble", "stock-reserved", {"sku": "kibble", "quantity": 2, "order_id": "o-1"}),
    ("order:o-1", "order-approved", {}),
)


def test_check_chain_accepts_a_sound_chain():
    """A chain built as the store builds it has no problem and reports its last seq and hash."""
    report = check_chain(SOUND)
    assert report.problem is None
    assert (report.count, report.last_seq, report.last_hash) == (4, 4, SOUND[-1].hash)
    assert check_chain([]).problem is None


def test_check_chain_names_the_first_changed_event():
    """Changed data, a changed field or a changed hash is reported at the first bad seq."""
    assert check_chain([SOUND[0], attrs.evolve(SOUND[1], data={"customer": "u-2", "items": []}), *SOUND[2:]]).problem \
        == "seq 2: hash mismatch (data or fields changed)"
    assert check_chain([*SOUND[:2], attrs.evolve(SOUND[2], actor="mallory"), SOUND[3]]).problem \
        == "seq 3: hash mismatch (data or fields changed)"
    assert check_chain([*SOUND[:3], attrs.evolve(SOUND[3], hash="0" * 64)]).problem \
        == "seq 4: hash mismatch (data or fields changed)"
    assert check_chain([attrs.evolve(SOUND[0], hash="zz")]).problem == "seq 1: malformed hash 'zz'"


def test_check_chain_names_gaps_repeats_and_version_breaks():
    """Seq must run 1, 2, 3 ... and each stream's version 1, 2, 3 ...; the first break is named."""
    assert check_chain([SOUND[0], SOUND[2], SOUND[3]]).problem == "seq 3: gap, expected seq 2"
    assert check_chain([SOUND[0], SOUND[1], SOUND[1]]).problem == "seq 2: out of order, expected seq 3"
    bumped = attrs.evolve(SOUND[2], version=3)
    assert check_chain([*SOUND[:2], bumped]).problem == "seq 3: sku:kibble has version 3, expected version 2"


def test_compare_projections_names_the_first_differing_order_then_sku():
    """Equal states compare clean; otherwise the first differing key and field are named."""
    order = Order("o-1", "u-1", "placed", (("kibble", 2),), None, None, 1, "t", "t", 2)
    stock = Stock("kibble", None, 3, 2, 2, 3)
    state = State({"o-1": order}, {"kibble": stock})
    assert compare_projections(state, state) is None
    assert compare_projections(State({"o-1": attrs.evolve(order, status="shipped")}, state.stock), state) \
        == "order o-1: projection has status='shipped', the log says 'placed'"
    assert compare_projections(State({}, state.stock), state) == "order o-1: in the log but missing from the projections"
    assert compare_projections(State(state.orders, {"kibble": attrs.evolve(stock, available=4)}), state) \
        == "sku kibble: projection has available=4, the log says 3"


def test_stored_hashes_recompute_for_awkward_text(tmp_path):
    """Events with non-ASCII, quotes, backslashes and control characters chain exactly as specified."""
    from orderlog.store.audit import stored_events
    from orderlog.domain import Command, Principal
    from orderlog.records import Request
    from orderlog.store import Store

    store = Store.open(str(tmp_path / "awkward.db"), create=True)
    staff, at = Principal("staff-ä", "staff"), "2026-11-25T17:03:00.123Z"
    awkward = 'Zürich "Katzenklo" \\ \n\t\u2028 🐶 \x7f'
    outcomes = store.execute_batch([
        Request(staff, Command("add_stock", "c-1", None, None, {"sku": "kibble", "quantity": 9, "name": awkward}), at),
        Request(staff, Command("place_order", "c-é", "o-1", None,
                               {"items": [{"sku": "kibble", "quantity": 2}], "ship_to": awkward, "customer": "u-1"}), at),
        Request(staff, Command("update_order", "c-3", "o-1", 1, {"note": "ñ" * 1000}), at),
    ]).outcomes
    assert [type(o).__name__ for o in outcomes] == ["Ack", "Ack", "Ack"]
    report = check_chain(stored_events(store))
    store.close()
    assert report.problem is None and report.count == 4
